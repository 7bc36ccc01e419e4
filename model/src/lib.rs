//! DeepSeek-V3.2 on burn (issue 6): not built yet.
