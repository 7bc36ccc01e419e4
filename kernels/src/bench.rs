//! Timing one kernel variant on a device: inputs uploaded once, warm-up launches (compilation and
//! first-touch stay out of the numbers), then batches of launches, each timed by the runtime's profiler —
//! device events on CUDA/HIP (and wgpu timestamp queries where the adapter has them), the host clock
//! around a sync otherwise. The median batch gives the time per launch. Used by `nsa bench` and autotune.
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::server::Handle;
use nsa_backends::Device;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Timing {
    /// Median over batches of (batch time / launches per batch).
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub launches: usize,
    /// `device events` or `host clock` (what the runtime's profiler measured with).
    pub method: &'static str,
}

fn sync(kernel: &dyn Kernel, variant: &Variant, device: &Device) -> Result<(), KernelError> {
    cubecl::future::block_on(device.client.sync()).map_err(|e| KernelError::device(kernel, variant, e))
}

/// Times `variant` on `problem` with `inputs` (host tensors, uploaded once; outputs reused). Batches
/// last about `target_batch_ms`; slow variants get fewer batches (at least one) so a hopeless variant
/// costs seconds, not minutes.
pub fn time(
    kernel: &dyn Kernel,
    variant: &Variant,
    device: &Device,
    problem: &Problem,
    inputs: &[HostTensor],
    target_batch_ms: f64,
) -> Result<Timing, KernelError> {
    time_unless_slower(kernel, variant, device, problem, inputs, target_batch_ms, f64::INFINITY)
}

/// [`time`], except that a launch slower than `give_up_ms` is not repeated: its one host-timed launch
/// is the result (autotune passes a multiple of the best time so far, which a slower variant cannot win).
pub fn time_unless_slower(
    kernel: &dyn Kernel,
    variant: &Variant,
    device: &Device,
    problem: &Problem,
    inputs: &[HostTensor],
    target_batch_ms: f64,
    give_up_ms: f64,
) -> Result<Timing, KernelError> {
    kernel.validate(problem)?;
    time_uploaded(
        kernel,
        variant,
        device,
        problem,
        &upload(device, inputs),
        target_batch_ms,
        give_up_ms,
    )
}

/// Inputs copied to the device once, for timing several variants on them ([`time_uploaded`]).
pub fn upload(device: &Device, inputs: &[HostTensor]) -> Vec<Handle> {
    inputs
        .iter()
        .map(|t| device.client.create_from_slice(bytemuck::cast_slice(&t.words)))
        .collect()
}

/// [`time_unless_slower`] on inputs already on the device (model-sized ones take seconds to copy).
pub fn time_uploaded(
    kernel: &dyn Kernel,
    variant: &Variant,
    device: &Device,
    problem: &Problem,
    input_handles: &[Handle],
    target_batch_ms: f64,
    give_up_ms: f64,
) -> Result<Timing, KernelError> {
    kernel.validate(problem)?;
    let client = &device.client;
    let output_handles: Vec<Handle> = kernel
        .outputs()
        .iter()
        .map(|spec| client.empty(4 * spec.words(problem).max(1)))
        .collect();
    let launch = || kernel.launch(variant, device, problem, input_handles, &output_handles);

    // Warm-up: compile, then measure one launch to size the batches.
    launch();
    sync(kernel, variant, device)?;
    let start = Instant::now();
    launch();
    sync(kernel, variant, device)?;
    let single_ms = start.elapsed().as_secs_f64() * 1e3;
    if single_ms > give_up_ms {
        return Ok(Timing {
            median_ms: single_ms,
            min_ms: single_ms,
            max_ms: single_ms,
            launches: 1,
            method: "host clock",
        });
    }
    let per_batch = ((target_batch_ms / single_ms.max(1e-3)) as usize).clamp(1, 1000);
    let batches = ((2000.0 / (single_ms * per_batch as f64)) as usize).clamp(1, 7);
    let mut samples = Vec::new();
    let mut method = "host clock";
    for _ in 0..batches {
        let (_, duration) = client
            .profile(
                || {
                    for _ in 0..per_batch {
                        launch();
                    }
                },
                "nsa bench",
            )
            .map_err(|e| KernelError::device(kernel, variant, format!("{e:?}")))?;
        if duration.timing_method() == cubecl::profile::TimingMethod::Device {
            method = "device events";
        }
        let ticks = cubecl::future::block_on(duration.resolve())
            .ok_or_else(|| KernelError::device(kernel, variant, "the profiler returned no measurement"))?;
        samples.push(ticks.duration().as_secs_f64() * 1e3 / per_batch as f64);
    }
    sync(kernel, variant, device)?;
    samples.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: samples[samples.len() / 2],
        min_ms: samples[0],
        max_ms: samples[samples.len() - 1],
        launches: per_batch * samples.len(),
        method,
    })
}
