//! OpenAI-compatible HTTP server (issue 7). Built so far: the streaming output parsers (reasoning, DSML and
//! V3.1 tool calls). The HTTP layer, chat encoding and the runtime are not built yet.
pub mod parsers;
