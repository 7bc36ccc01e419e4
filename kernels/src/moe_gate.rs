//! DeepSeek-V3/V3.2 MoE routing (`noaux_tc`): from router logits to each token's experts and weights.
//!
//! logits [tokens, experts] f32 (hidden · gate weightᵀ), bias [experts] f32 (e_score_correction_bias) →
//! ids [tokens, top_k] i32, weights [tokens, top_k] f32, as Hugging Face's DeepseekV3 gate computes them:
//! s = sigmoid(logit); c = s + bias (for selection only); experts in n_group groups, a group scored by the
//! sum of its two largest c; the topk_group best groups kept; c of the other groups' experts set to 0; the
//! top_k largest c chosen; weights = s of the chosen, divided by their sum (+10⁻²⁰) when `norm`, times
//! routed_scaling_factor. Ties go to the lower index. Each row's selection is a set: ids and weights are
//! compared sorted.
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{DType, HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;

/// Units per cube: one per expert (experts ≤ 256).
const UNITS: u32 = 256;

pub const VARIANTS: &[Variant] = &[Variant {
    name: "rank",
    summary: "one cube per token, one unit per expert; groups and experts chosen by parallel ranking",
    needs_plane_ops: false,
}];

/// How many of `values[0..n]` come before `values[me]`: larger, or equal at a lower index.
#[cube]
fn rank_of(values: &[f32], me: usize, n: usize) -> usize {
    let mine = values[me];
    let mut rank = 0usize;
    for i in 0..n {
        let other = values[i];
        rank += usize::cast_from(other > mine || (other == mine && i < me));
    }
    rank
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn moe_gate_kernel(
    logits: &[f32],
    bias: &[f32],
    ids: &mut [i32],
    weights: &mut [f32],
    tokens: usize,
    experts: usize,
    groups: usize,
    topk_group: usize,
    top_k: usize,
    scaling: f32,
    #[comptime] normalize: bool,
) {
    let token = CUBE_POS;
    if token >= tokens {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let mut score = Shared::<[f32]>::new_slice(UNITS as usize);
    let mut choice = Shared::<[f32]>::new_slice(UNITS as usize);
    let mut group_score = Shared::<[f32]>::new_slice(UNITS as usize);
    let mut kept = Shared::<[u32]>::new_slice(UNITS as usize);
    let mut chosen_score = Shared::<[f32]>::new_slice(UNITS as usize);
    let mut chosen_id = Shared::<[u32]>::new_slice(UNITS as usize);
    let per_group = experts / groups;

    if unit < experts {
        let s = 1.0f32 / (1.0f32 + f32::exp(-logits[token * experts + unit]));
        score[unit] = s;
        choice[unit] = s + bias[unit];
    }
    sync_cube();
    // A group's score: the sum of its two largest biased scores.
    if unit < groups {
        let first = unit * per_group;
        let mut best = choice[first];
        let mut second = f32::reinterpret(0xff80_0000u32);
        for i in 1..per_group {
            let c = choice[first + i];
            if c > best {
                second = best;
                best = c;
            } else if c > second {
                second = c;
            }
        }
        group_score[unit] = best + second;
    }
    sync_cube();
    if unit < groups {
        kept[unit] = u32::cast_from(rank_of(&group_score, unit, groups) < topk_group);
    }
    sync_cube();
    // Experts of dropped groups compete with 0, as Hugging Face's masked_fill does.
    let mut masked = 0.0f32;
    if unit < experts && kept[unit / per_group] == 1 {
        masked = choice[unit];
    }
    sync_cube();
    if unit < experts {
        choice[unit] = masked;
    }
    sync_cube();
    if unit < experts {
        let rank = rank_of(&choice, unit, experts);
        if rank < top_k {
            chosen_id[rank] = unit as u32;
            chosen_score[rank] = score[unit];
        }
    }
    sync_cube();
    if unit < top_k {
        let mut weight = chosen_score[unit];
        if comptime!(normalize) {
            let mut sum = 0.0f32;
            for i in 0..top_k {
                sum += chosen_score[i];
            }
            weight /= sum + 1e-20f32;
        }
        ids[token * top_k + unit] = chosen_id[unit] as i32;
        weights[token * top_k + unit] = weight * scaling;
    }
}

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("logits", &["tokens", "experts"], Storage::F32),
    TensorSpec::new("bias", &["experts"], Storage::F32),
];
const OUTPUTS: &[TensorSpec] = &[
    TensorSpec::new("ids", &["tokens", "top_k"], Storage::I32),
    TensorSpec::new("weights", &["tokens", "top_k"], Storage::F32),
];

fn dims(tokens: usize, experts: usize, top_k: usize) -> Vec<(&'static str, usize)> {
    vec![("tokens", tokens), ("experts", experts), ("top_k", top_k)]
}

/// DeepSeek-V3.2's routing: 8 groups, 4 kept, scaling 2.5, normalized.
const V32: &[(&str, f64)] = &[("n_group", 8.0), ("topk_group", 4.0), ("scaling", 2.5), ("norm", 1.0)];

/// The reference routing of one token in f64: (ids, weights) in selection order.
fn route(logits: &[f64], bias: &[f64], problem: &Problem) -> (Vec<usize>, Vec<f64>) {
    let experts = logits.len();
    let (groups, topk_group) = (problem.param("n_group") as usize, problem.param("topk_group") as usize);
    let top_k = problem.dim("top_k");
    let score: Vec<f64> = logits.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
    let choice: Vec<f64> = score.iter().zip(bias).map(|(s, b)| s + b).collect();
    let per_group = experts / groups;
    let group_score: Vec<f64> = choice
        .chunks(per_group)
        .map(|g| {
            let mut sorted = g.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[0] + sorted.get(1).copied().unwrap_or(f64::NEG_INFINITY)
        })
        .collect();
    let order = |values: &[f64]| {
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        idx
    };
    let kept: Vec<usize> = order(&group_score).into_iter().take(topk_group).collect();
    let masked: Vec<f64> = (0..experts)
        .map(|e| {
            if kept.contains(&(e / per_group)) {
                choice[e]
            } else {
                0.0
            }
        })
        .collect();
    let chosen: Vec<usize> = order(&masked).into_iter().take(top_k).collect();
    let sum: f64 = chosen.iter().map(|&e| score[e]).sum();
    let norm = problem.param("norm") != 0.0;
    let weights = chosen
        .iter()
        .map(|&e| problem.param("scaling") * if norm { score[e] / (sum + 1e-20) } else { score[e] })
        .collect();
    (chosen, weights)
}

/// The smallest gap that decides a token's routing (group boundary, expert boundary), so tests can draw
/// tie-free tokens: f32 arithmetic on the device must not be able to reorder them.
fn decision_margin(logits: &[f64], bias: &[f64], problem: &Problem) -> f64 {
    let experts = logits.len();
    let (groups, topk_group) = (problem.param("n_group") as usize, problem.param("topk_group") as usize);
    let top_k = problem.dim("top_k");
    let choice: Vec<f64> = logits
        .iter()
        .zip(bias)
        .map(|(x, b)| 1.0 / (1.0 + (-x).exp()) + b)
        .collect();
    let per_group = experts / groups;
    let mut group_score: Vec<f64> = choice
        .chunks(per_group)
        .map(|g| {
            let mut sorted = g.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[0] + sorted.get(1).copied().unwrap_or(f64::NEG_INFINITY)
        })
        .collect();
    let mut sorted_groups = group_score.clone();
    sorted_groups.sort_by(|a, b| b.total_cmp(a));
    let group_gap = if topk_group < groups {
        sorted_groups[topk_group - 1] - sorted_groups[topk_group]
    } else {
        f64::INFINITY
    };
    let threshold = sorted_groups[topk_group - 1];
    group_score
        .iter_mut()
        .for_each(|g| *g = if *g >= threshold { 1.0 } else { 0.0 });
    let mut masked: Vec<f64> = (0..experts)
        .map(|e| {
            if group_score[e / per_group] == 1.0 {
                choice[e]
            } else {
                0.0
            }
        })
        .collect();
    masked.sort_by(|a, b| b.total_cmp(a));
    let expert_gap = if top_k < experts {
        masked[top_k - 1] - masked[top_k]
    } else {
        f64::INFINITY
    };
    group_gap.min(expert_gap)
}

pub struct MoeGate;

impl Kernel for MoeGate {
    fn name(&self) -> &'static str {
        "moe_gate"
    }
    fn summary(&self) -> &'static str {
        "DeepSeek-V3 noaux_tc routing: sigmoid, biased group-limited top-k, normalized scaled weights"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        INPUTS
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        OUTPUTS
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        V32
    }
    fn formats(&self) -> &'static [Format] {
        &[Format::F32]
    }
    fn problems(&self) -> Vec<Problem> {
        // (tokens, experts, top_k, n_group, topk_group, norm): DeepSeek-V3.2's 256 / 8 / 8 groups / 4; the tiny
        // checkpoint's shape; one group of everything; unnormalized weights.
        [
            (37, 256, 8, 8.0, 4.0, 1.0),
            (9, 16, 4, 4.0, 2.0, 1.0),
            (5, 64, 6, 1.0, 1.0, 0.0),
            (6, 128, 8, 8.0, 8.0, 1.0),
        ]
        .into_iter()
        .map(|(tokens, experts, top_k, n_group, topk_group, norm)| {
            Problem::new(
                Format::F32,
                &dims(tokens, experts, top_k),
                &[
                    ("n_group", n_group),
                    ("topk_group", topk_group),
                    ("scaling", 2.5),
                    ("norm", norm),
                ],
            )
        })
        .collect()
    }
    fn bench_problems(&self) -> Vec<Problem> {
        [256, 8192]
            .into_iter()
            .map(|tokens| Problem::new(Format::F32, &dims(tokens, 256, 8), V32))
            .collect()
    }
    fn ir_problem(&self, _: Format) -> Problem {
        Problem::new(Format::F32, &dims(16, 256, 8), V32)
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        let (experts, top_k) = (problem.dim("experts"), problem.dim("top_k"));
        let (groups, topk_group) = (problem.param("n_group") as usize, problem.param("topk_group") as usize);
        let ok = (1..=UNITS as usize).contains(&experts)
            && groups >= 1
            && experts.is_multiple_of(groups)
            && (1..=groups).contains(&topk_group)
            && (1..=topk_group * (experts / groups)).contains(&top_k);
        if !ok {
            return Err(KernelError::InvalidProblem {
                kernel: "moe_gate",
                field: "experts",
                expected: "1 ≤ experts ≤ 256 in n_group equal groups, 1 ≤ topk_group ≤ n_group, \
                           1 ≤ top_k ≤ the kept groups' experts"
                    .into(),
                got: format!("experts {experts}, n_group {groups}, topk_group {topk_group}, top_k {top_k}"),
            });
        }
        Ok(())
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // Sigmoid and bias, then a ranking comparison per expert pair.
        let experts = problem.dim("experts");
        (problem.dim("tokens") * (4 * experts + experts * experts)) as u64
    }
    fn tolerance(&self, output: &TensorSpec, _: &Problem) -> f64 {
        if output.name == "ids" { 0.0 } else { 1e-5 }
    }
    fn canonicalize(&self, _: &TensorSpec, problem: &Problem, values: &mut [f64]) {
        for row in values.chunks_mut(problem.dim("top_k")) {
            row.sort_by(f64::total_cmp);
        }
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let (tokens, experts) = (problem.dim("tokens"), problem.dim("experts"));
        // Bias ~ N(0, 0.1²): some biased scores negative, so dropped groups' zeros can win (as in HF).
        let bias: Vec<f32> = crate::check::normal(rng, experts).iter().map(|v| v * 0.1).collect();
        let bias64: Vec<f64> = bias.iter().map(|b| *b as f64).collect();
        let mut logits = Vec::with_capacity(tokens * experts);
        for _ in 0..tokens {
            // Tie-free tokens: redraw until every deciding gap is well above f32 rounding.
            loop {
                let row: Vec<f32> = crate::check::normal(rng, experts).iter().map(|v| v * 2.0).collect();
                let row64: Vec<f64> = row.iter().map(|v| *v as f64).collect();
                if decision_margin(&row64, &bias64, problem) > 1e-4 {
                    logits.extend(row);
                    break;
                }
            }
        }
        vec![
            HostTensor::from_f32("logits", &[tokens, experts], DType::F32, &logits),
            HostTensor::from_f32("bias", &[experts], DType::F32, &bias),
        ]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let experts = problem.dim("experts");
        let (logits, bias) = (inputs[0].to_f64(), inputs[1].to_f64());
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        for row in logits.chunks(experts) {
            let (chosen, w) = route(row, &bias, problem);
            ids.extend(chosen.iter().map(|&e| e as f64));
            weights.extend(w);
        }
        vec![ids, weights]
    }
    fn launch(&self, _: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (tokens, experts, top_k) = (problem.dim("tokens"), problem.dim("experts"), problem.dim("top_k"));
        moe_gate_kernel::launch(
            &device.client,
            grid(tokens),
            CubeDim::new_1d(UNITS),
            buffer(&inputs[0], tokens * experts),
            buffer(&inputs[1], experts),
            buffer(&outputs[0], tokens * top_k),
            buffer(&outputs[1], tokens * top_k),
            tokens,
            experts,
            problem.param("n_group") as usize,
            problem.param("topk_group") as usize,
            top_k,
            problem.param("scaling") as f32,
            problem.param("norm") != 0.0,
        );
    }
    fn define(&self, _: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        moe_gate_kernel::MoeGateKernel::new(
            ir_settings(CubeDim::new_1d(UNITS)),
            props,
            target_props,
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            (),
            (),
            (),
            (),
            (),
            (),
            problem.param("norm") != 0.0,
        )
        .define()
    }
}
