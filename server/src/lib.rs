//! OpenAI-compatible HTTP server (issue 7): not built yet.
