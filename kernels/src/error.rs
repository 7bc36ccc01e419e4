use thiserror::Error;

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("unknown kernel `{given}`; valid kernels: {valid}")]
    UnknownKernel { given: String, valid: String },
    #[error("kernel `{kernel}` has no variant `{given}`; valid variants: {valid}")]
    UnknownVariant {
        kernel: &'static str,
        given: String,
        valid: String,
    },
    #[error("{kernel}: invalid problem: {field} must be {expected}, got {got}")]
    InvalidProblem {
        kernel: &'static str,
        field: &'static str,
        expected: String,
        got: String,
    },
    #[error("{kernel}/{variant} is not supported on this device: {reason}")]
    Unsupported {
        kernel: &'static str,
        variant: &'static str,
        reason: String,
    },
    #[error("tensor `{name}`: expected {expected}, got {got}")]
    BadTensor {
        name: String,
        expected: String,
        got: String,
    },
    #[error("missing tensor `{name}` (expected {expected})")]
    MissingTensor { name: String, expected: String },
    #[error("{kernel}/{variant} failed on the device: {reason}")]
    Device {
        kernel: &'static str,
        variant: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Backend(#[from] nsa_backends::BackendError),
}

impl KernelError {
    /// `variant` of `kernel` failed on the device with `error` (its message as [`device_reason`] keeps it).
    pub fn device(kernel: &dyn crate::Kernel, variant: &crate::Variant, error: impl std::fmt::Display) -> Self {
        KernelError::Device {
            kernel: kernel.name(),
            variant: variant.name,
            reason: device_reason(error),
        }
    }
}

/// A device error's message for [`KernelError::Device`]: its lines without the backtrace notes (a
/// compiler's log included), trimmed, at most 40.
pub fn device_reason(error: impl std::fmt::Display) -> String {
    let text = error.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().contains("backtrace"))
        .take(40)
        .collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::device_reason;

    #[test]
    fn a_device_reason_keeps_the_compiler_log_and_drops_backtrace_notes() {
        let error =
            "Compilation failed\n  ptxas error: Arguments mismatch for instruction 'cvt'  \n\nNo backtrace available";
        assert_eq!(
            device_reason(error),
            "Compilation failed\nptxas error: Arguments mismatch for instruction 'cvt'"
        );
        let long: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(device_reason(long).lines().count(), 40);
    }
}
