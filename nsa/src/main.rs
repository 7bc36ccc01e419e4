//! `nsa`: the one binary. Each subcommand is a thin layer over the crates.
mod autotune;
mod bench;
mod bench_layer;
mod devices;
mod ir;
mod model_cmd;
mod plot;
mod run_kernel;
mod selftest;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "nsa",
    version,
    about = "DeepSeek-V3.2 sparse attention kernels, written once in CubeCL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the devices every compiled-in runtime (cuda, hip, wgpu) finds, with their features.
    Devices(devices::Args),
    /// Print a kernel's generated source for a target (no GPU needed), or list kernels with --list.
    Ir(ir::Args),
    /// Check every kernel variant against its f64 reference on a device and print a table.
    Selftest(selftest::Args),
    /// Run one kernel on tensors from a safetensors file and write its outputs to another.
    RunKernel(run_kernel::Args),
    /// Time kernel variants on a device beside a PyTorch reference.
    Bench(bench::Args),
    /// Time one DeepSeek-V3.2 layer's prefill as nsa's kernel launches, split by group, beside PyTorch.
    BenchLayer(bench_layer::Args),
    /// Measure every kernel variant on a grid of shapes on a device and write a tuning table.
    Autotune(autotune::Args),
    /// One prefill of token ids through a DeepSeek-V3.2 checkpoint; writes logits and per-layer selections.
    Forward(model_cmd::ForwardArgs),
    /// Continue a prompt with a DeepSeek-V3.2 checkpoint, streaming the text.
    Generate(model_cmd::GenerateArgs),
    /// Serve a DeepSeek-V3.2 checkpoint over an OpenAI-compatible HTTP API (default: the bundled tiny model).
    Serve(Box<serve::Args>),
}

/// A command's failure: bad input (exit code 2, one line naming the valid choices) or a failed run (1).
pub enum Failure {
    Usage(String),
    Run(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(error: E) -> Failure {
        Failure::Run(error.to_string())
    }
}

pub fn usage(error: impl std::fmt::Display) -> Failure {
    Failure::Usage(error.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices(args) => devices::run(args),
        Command::Ir(args) => ir::run(args),
        Command::Selftest(args) => selftest::run(args),
        Command::RunKernel(args) => run_kernel::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchLayer(args) => bench_layer::run(args),
        Command::Autotune(args) => autotune::run(args),
        Command::Forward(args) => model_cmd::forward(args),
        Command::Generate(args) => model_cmd::generate(args),
        Command::Serve(args) => serve::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Run(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

/// The device `--device` names (or the best one), as a usage error when it names nothing valid.
pub fn open_device(spec: Option<&str>) -> Result<nsa_backends::Device, Failure> {
    use nsa_backends::BackendError;
    nsa_backends::select(spec).map_err(|error| match error {
        BackendError::InvalidDeviceSpec { .. } | BackendError::NoSuchDevice { .. } => usage(error),
        other => Failure::Run(other.to_string()),
    })
}
