use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("invalid device `{given}`: expected one of {expected}")]
    InvalidDeviceSpec { given: String, expected: String },
    #[error("no {runtime} device {index} on this machine; found: {found}")]
    NoSuchDevice {
        runtime: &'static str,
        index: usize,
        found: String,
    },
    #[error("no GPU runtime found a device (tried cuda, hip, wgpu)")]
    NoDevice,
    #[error("could not compile for {target}: {reason}")]
    Compile { target: &'static str, reason: String },
}
