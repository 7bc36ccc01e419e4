//! Cross-crate integration tests (golden model: issue 6; server end to end: issue 7). The `nsa` command is tested end to end in `nsa/tests/cli.rs`.
pub mod scripted;
pub mod sse;
