//! Timing one kernel variant on a device: inputs uploaded once, warm-up launches (compilation and
//! first-touch stay out of the numbers), then batches of launches each closed by a device sync; the
//! median batch gives the time per launch. Used by `nsa bench` (and autotune, later).
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
}

fn sync(kernel: &dyn Kernel, variant: &Variant, device: &Device) -> Result<(), KernelError> {
    cubecl::future::block_on(device.client.sync()).map_err(|e| KernelError::Device {
        kernel: kernel.name(),
        variant: variant.name,
        reason: e
            .to_string()
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string(),
    })
}

/// Times `variant` on `problem` with `inputs` (host tensors, uploaded once; outputs reused).
pub fn time(
    kernel: &dyn Kernel,
    variant: &Variant,
    device: &Device,
    problem: &Problem,
    inputs: &[HostTensor],
    target_batch_ms: f64,
) -> Result<Timing, KernelError> {
    kernel.validate(problem)?;
    let client = &device.client;
    let input_handles: Vec<Handle> = inputs
        .iter()
        .map(|t| client.create_from_slice(bytemuck::cast_slice(&t.words)))
        .collect();
    let output_handles: Vec<Handle> = kernel
        .outputs()
        .iter()
        .map(|spec| client.empty(4 * spec.words(problem).max(1)))
        .collect();
    let launch = || kernel.launch(variant, device, problem, &input_handles, &output_handles);

    // Warm-up: compile, then measure one launch to size the batches.
    launch();
    sync(kernel, variant, device)?;
    let start = Instant::now();
    launch();
    sync(kernel, variant, device)?;
    let single_ms = start.elapsed().as_secs_f64() * 1e3;
    let per_batch = ((target_batch_ms / single_ms.max(1e-3)) as usize).clamp(1, 1000);
    let mut samples = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        for _ in 0..per_batch {
            launch();
        }
        sync(kernel, variant, device)?;
        samples.push(start.elapsed().as_secs_f64() * 1e3 / per_batch as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: samples[samples.len() / 2],
        min_ms: samples[0],
        max_ms: samples[samples.len() - 1],
        launches: per_batch * samples.len(),
    })
}
