//! Serves a scripted model (`nsa_tests::scripted`) for clients that cannot be driven from Rust: every
//! prompt is answered with the text of a file.
//!
//!     nsa-scripted-server PORT ANSWER_FILE [deepseekv32|deepseekv31]
use nsa_server::http::ToolCallParser;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: nsa-scripted-server PORT ANSWER_FILE [deepseekv32|deepseekv31]";
    let (port, file) = match args.as_slice() {
        [port, file] | [port, file, _] => (port.parse::<u16>().expect(usage), file),
        _ => panic!("{usage}"),
    };
    let parser = match args.get(2).map(String::as_str) {
        None => None,
        Some("deepseekv32") => Some(ToolCallParser::Deepseekv32),
        Some("deepseekv31") => Some(ToolCallParser::Deepseekv31),
        Some(other) => panic!("{usage}: unknown parser {other}"),
    };
    let answer = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    let result = nsa_tests::scripted::serve_script(answer.trim_end(), parser, Duration::ZERO, port, |address| {
        eprintln!("scripted server on http://{address}")
    });
    if let Err(error) = result {
        eprintln!("nsa-scripted-server: {error}");
        std::process::exit(1);
    }
}
