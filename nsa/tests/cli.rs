//! The `nsa` command end to end: listing, IR without a GPU, bad input, and a run-kernel round trip on
//! the best device found (lavapipe in CI).
use std::process::Command;

fn nsa(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nsa"))
        .args(args)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .output()
        .expect("nsa runs")
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn ir_list_names_every_kernel_first() {
    let output = nsa(&["ir", "--list"]);
    assert!(output.status.success());
    let names: Vec<String> = stdout(&output)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    for kernel in ["rms_norm", "layer_norm", "rope_interleaved", "rope_neox", "silu_mul"] {
        assert!(names.iter().any(|n| n == kernel), "{kernel} missing from {names:?}");
    }
}

#[test]
fn ir_prints_source_for_every_target() {
    for (target, marker) in [
        ("cuda", "__global__"),
        ("hip", "__global__"),
        ("wgsl", "@compute"),
        ("spirv", "OpEntryPoint"),
    ] {
        let output = nsa(&["ir", "rms_norm", "--variant", "shared", "--target", target]);
        assert!(output.status.success(), "{target}: {}", stderr(&output));
        assert!(stdout(&output).contains(marker), "{target} source lacks {marker}");
    }
}

#[test]
fn bad_input_is_one_line_naming_the_choices_with_exit_code_2() {
    for (args, mentions) in [
        (vec!["ir", "no_such_kernel"], "rms_norm"),
        (vec!["ir", "rms_norm", "--variant", "nope"], "plane, shared"),
        (vec!["ir", "rms_norm", "--target", "ptx"], "cuda, hip, wgsl, spirv"),
        (vec!["ir", "rms_norm", "--dtype", "f8"], "f32, bf16"),
        (vec!["ir", "gemm", "--target", "wgsl"], "no variant with generated code"),
        (vec!["autotune", "--kernels", "nope"], "rms_norm"),
        (vec!["autotune", "--budget", "5 minutes"], "90s, 10m, 1h"),
        (vec!["autotune", "--grid", "huge"], "model, tests"),
        (vec!["autotune", "--batch-ms", "0"], "--batch-ms"),
        (
            vec!["ir", "sparse_mla_prefill", "--variant", "mma_h64", "--dtype", "f32"],
            "--dtype bf16",
        ),
        (vec!["selftest", "--device", "tpu:0"], "cuda[:N]"),
        (vec!["selftest", "--device", "cuda:7"], "cuda"),
    ] {
        let output = nsa(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        let message = stderr(&output);
        assert_eq!(message.trim().lines().count(), 1, "{args:?}: {message}");
        assert!(message.contains(mentions), "{args:?}: {message}");
    }
}

fn write_safetensors(path: &std::path::Path, tensors: &[(&str, Vec<usize>, safetensors::Dtype, Vec<u8>)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, shape, dtype, data)| {
            (
                name.to_string(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn run_kernel_round_trip_matches_the_reference() {
    let dir = std::env::temp_dir().join(format!("nsa-run-kernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rows, hidden) = (3usize, 96usize);
    let x: Vec<f32> = (0..rows * hidden)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
        .collect();
    let weight: Vec<f32> = (0..hidden).map(|i| 0.5 + (i % 7) as f32 / 10.0).collect();
    let inputs = dir.join("in.safetensors");
    write_safetensors(
        &inputs,
        &[
            ("x", vec![rows, hidden], safetensors::Dtype::F32, f32_bytes(&x)),
            ("weight", vec![hidden], safetensors::Dtype::F32, f32_bytes(&weight)),
        ],
    );
    let out = dir.join("out.safetensors");
    let output = nsa(&[
        "run-kernel",
        "rms_norm",
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--param",
        "eps=1e-5",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let bytes = std::fs::read(&out).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor("out").unwrap();
    assert_eq!(view.shape(), &[rows, hidden]);
    let got: Vec<f32> = view
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for r in 0..rows {
        let row = &x[r * hidden..][..hidden];
        let inv = 1.0 / (row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / hidden as f64 + 1e-5).sqrt();
        for i in 0..hidden {
            let want = row[i] as f64 * inv * weight[i] as f64;
            assert!(
                (got[r * hidden + i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "[{r}, {i}]"
            );
        }
    }
}

#[test]
fn run_kernel_names_a_missing_or_misshaped_tensor() {
    let dir = std::env::temp_dir().join(format!("nsa-run-kernel-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let inputs = dir.join("in.safetensors");
    write_safetensors(
        &inputs,
        &[("x", vec![2, 8], safetensors::Dtype::F32, f32_bytes(&[1.0; 16]))],
    );
    let out = dir.join("out.safetensors");
    let output = nsa(&[
        "run-kernel",
        "rms_norm",
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("weight") && stderr(&output).contains("[hidden]"),
        "{}",
        stderr(&output)
    );

    write_safetensors(
        &inputs,
        &[
            ("x", vec![2, 8], safetensors::Dtype::F32, f32_bytes(&[1.0; 16])),
            ("weight", vec![9], safetensors::Dtype::F32, f32_bytes(&[1.0; 9])),
        ],
    );
    let output = nsa(&[
        "run-kernel",
        "rms_norm",
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("weight") && stderr(&output).contains("[8] F32"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn run_kernel_takes_scalars_and_optional_inputs() {
    // topk with `k` as a 0-d I32 tensor and no `limit` (every position allowed).
    let dir = std::env::temp_dir().join(format!("nsa-run-kernel-topk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scores: Vec<f32> = vec![0.5, -1.0, 3.0, 2.0, 0.0, 9.0, -4.0, 1.0, 8.0, 7.0, 6.5, 0.25];
    let inputs = dir.join("in.safetensors");
    write_safetensors(
        &inputs,
        &[
            ("scores", vec![2, 6], safetensors::Dtype::F32, f32_bytes(&scores)),
            ("k", vec![], safetensors::Dtype::I32, 3i32.to_le_bytes().to_vec()),
        ],
    );
    let out = dir.join("out.safetensors");
    let output = nsa(&[
        "run-kernel",
        "topk",
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let bytes = std::fs::read(&out).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor("indices").unwrap();
    assert_eq!(view.shape(), &[2, 3]);
    let got: Vec<i32> = view
        .data()
        .chunks(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let (mut first, mut second) = (got[..3].to_vec(), got[3..].to_vec());
    first.sort();
    second.sort();
    assert_eq!(first, vec![2, 3, 5]);
    assert_eq!(second, vec![2, 3, 4]);
}

#[test]
fn bench_prints_a_row_per_supported_variant() {
    let output = nsa(&[
        "bench",
        "rms_norm",
        "--shape",
        "rows=2",
        "--shape",
        "hidden=128",
        "--batch-ms",
        "5",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let table = stdout(&output);
    assert!(table.contains("median of ~5 ms batches"), "{table}");
    let rows: Vec<&str> = table.lines().filter(|l| l.contains("rows=2 hidden=128")).collect();
    assert!(!rows.is_empty(), "{table}");
    for row in rows {
        let time: f64 = row.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert!(time > 0.0, "{row}");
    }
    let bad = nsa(&["bench", "rms_norm", "--shape", "width=3"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("rows, hidden"), "{}", stderr(&bad));
    let no_batch = nsa(&["bench", "rms_norm", "--batch-ms", "0"]);
    assert_eq!(no_batch.status.code(), Some(2));
    assert!(stderr(&no_batch).contains("--batch-ms"), "{}", stderr(&no_batch));
}

#[test]
fn autotune_measures_resumes_shows_and_rejects_foreign_tables() {
    let dir = std::env::temp_dir().join(format!("nsa-autotune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let table = dir.join("table.json");
    let out = table.to_str().unwrap();
    // `nsa autotune` of rms_norm on the test grid into `out`, with `extra` flags.
    let tune_rms_norm = |extra: &[&str]| {
        nsa(&[
            &["autotune", "--kernels", "rms_norm", "--grid", "tests", "--out", out][..],
            extra,
        ]
        .concat())
    };
    let first = tune_rms_norm(&["--batch-ms", "5"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    assert_eq!(json["batch_ms"], 5.0);
    let entries = json["entries"].as_array().unwrap();
    assert!(!entries.is_empty());
    assert!(
        entries
            .iter()
            .all(|e| e["kernel"] == "rms_norm" && e["times_ms"][e["best"].as_str().unwrap()].is_number())
    );
    // Resuming with another batch length would mix two clocks' measurements in one table.
    let other_batch = tune_rms_norm(&["--batch-ms", "7"]);
    assert_eq!(other_batch.status.code(), Some(2), "{}", stderr(&other_batch));
    assert!(
        stderr(&other_batch).contains("measured in 5 ms batches"),
        "{}",
        stderr(&other_batch)
    );
    // A rerun resumes (with the table's batch length): nothing left to measure.
    let again = tune_rms_norm(&[]);
    assert!(
        again.status.success() && stderr(&again).contains(" 0 measurements"),
        "{}",
        stderr(&again)
    );
    // A configuration past 5× the best at one bucket is not measured at the others, unless --exhaustive:
    // make `shared` look 100× slower than a (made-up) rival at the first bucket and forget it elsewhere.
    let original = std::fs::read_to_string(&table).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    let entries = json["entries"].as_array_mut().unwrap();
    let shared = entries[0]["times_ms"]["shared"].as_f64().unwrap();
    entries[0]["times_ms"]["rival"] = serde_json::json!(shared / 100.0);
    for entry in entries.iter_mut().skip(1) {
        entry["times_ms"].as_object_mut().unwrap().remove("shared");
    }
    std::fs::write(&table, json.to_string()).unwrap();
    let pruned = tune_rms_norm(&[]);
    assert!(pruned.status.success(), "{}", stderr(&pruned));
    assert!(
        stderr(&pruned).contains("skipped, 100× the best at"),
        "{}",
        stderr(&pruned)
    );
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    assert!(json["entries"].as_array().unwrap()[1]["times_ms"]["shared"].is_null());
    let exhaustive = tune_rms_norm(&["--exhaustive"]);
    assert!(exhaustive.status.success(), "{}", stderr(&exhaustive));
    assert!(!stderr(&exhaustive).contains(": skipped"), "{}", stderr(&exhaustive));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    let entries = json["entries"].as_array().unwrap();
    assert!(entries.iter().all(|e| e["times_ms"]["shared"].is_number()));
    std::fs::write(&table, &original).unwrap();
    let plot = dir.join("plot.svg");
    let show = nsa(&["autotune", "--show", "--out", out, "--plot", plot.to_str().unwrap()]);
    let listing = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success() && listing.contains("rms_norm") && !listing.contains("stale"),
        "{listing}"
    );
    // An entry measured on other code is marked, and counted at the end.
    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    json["entries"][0]["version"] = "0000000000000000".into();
    let older = dir.join("older.json");
    std::fs::write(&older, json.to_string()).unwrap();
    let show_older = nsa(&["autotune", "--show", "--out", older.to_str().unwrap()]);
    let listing = String::from_utf8_lossy(&show_older.stdout);
    assert!(
        listing.matches("(stale: measured on older code, ignored)").count() == 1
            && listing.contains(&format!(
                "1 of {} entries are stale",
                json["entries"].as_array().unwrap().len()
            )),
        "{listing}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.trim_end().ends_with("</svg>"));
    // bench follows the table: the nearest bucket's fastest variant, labelled as tuned.
    let shape = ["--shape", "rows=2", "--shape", "hidden=64"];
    let bench = nsa(&[&["bench", "rms_norm", "--variant", "tuned", "--table", out][..], &shape].concat());
    let stdout = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success() && stdout.contains("Tuned pick"),
        "{stdout}{}",
        stderr(&bench)
    );
    // Not a table, another format, another device: one-line errors, exit 2, the file left alone.
    for (content, mentions) in [
        ("{ not json", "not an nsa tuning table"),
        (
            r#"{"format": "nsa-tuning-0", "device": {}, "entries": []}"#,
            "nsa-tuning-1",
        ),
        (
            r#"{"format": "nsa-tuning-1", "device": {"runtime": "cuda", "name": "Other GPU", "arch": "sm_90"}, "entries": []}"#,
            "not on this device",
        ),
    ] {
        std::fs::write(&table, content).unwrap();
        let output = tune_rms_norm(&[]);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(mentions), "{}", stderr(&output));
        assert_eq!(std::fs::read_to_string(&table).unwrap(), content);
        // bench warns and falls back to the defaults instead of failing.
        let bench = nsa(&[&["bench", "rms_norm", "--variant", "tuned", "--table", out][..], &shape].concat());
        assert!(bench.status.success(), "{}", stderr(&bench));
        assert!(String::from_utf8_lossy(&bench.stdout).contains("Default pick"));
        assert!(stderr(&bench).contains("warning"), "{}", stderr(&bench));
    }
    // Strategies: both options measured per bucket, the rule's pick shown beside the measured one.
    std::fs::remove_file(&table).unwrap();
    let strategy = nsa(&["autotune", "--kernels", "mha_one_shot", "--grid", "tests", "--out", out]);
    assert!(strategy.status.success(), "{}", stderr(&strategy));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    let entries = json["entries"].as_array().unwrap();
    assert!(!entries.is_empty());
    assert!(entries.iter().all(|e| e["kernel"] == "strategy:mha_one_shot"
        && e["times_ms"]["mha_one_shot"].is_number()
        && e["times_ms"]["sparse"].is_number()));
    let show = nsa(&["autotune", "--show", "--out", out]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("rule of strategy:mha_one_shot"));
    std::fs::remove_dir_all(&dir).unwrap();
}

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/tiny-v32/golden.safetensors");

fn golden_ids(name: &str) -> Vec<i64> {
    let bytes = std::fs::read(GOLDEN).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    view.data()
        .chunks(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn forward_writes_the_golden_logits_and_refuses_bad_input() {
    let dir = std::env::temp_dir().join(format!("nsa-forward-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ids = golden_ids("seq8.input_ids");
    let input = dir.join("ids.safetensors");
    let id_bytes: Vec<u8> = ids.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect();
    write_safetensors(
        &input,
        &[("input_ids", vec![ids.len()], safetensors::Dtype::I32, id_bytes)],
    );
    let out = dir.join("out.safetensors");
    let run = nsa(&[
        "forward",
        "--input-ids",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let bytes = std::fs::read(&out).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |file: &safetensors::SafeTensors, name: &str| -> Vec<f32> {
        let view = file.tensor(name).unwrap();
        view.data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let golden_bytes = std::fs::read(GOLDEN).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&golden_bytes).unwrap();
    let (ours, theirs) = (f32s(&file, "logits"), f32s(&golden, "seq8.logits"));
    assert_eq!(ours.len(), 8 * 1024);
    let error = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(error <= 1e-3, "logits max |Δ| {error}");
    for name in [
        "layer_out",
        "layer0.index_topk",
        "layer2.index_topk",
        "layer1.router_topk_ids",
    ] {
        assert!(file.tensor(name).is_ok(), "{name} written");
    }
    assert_eq!(file.tensor("layer2.router_topk_ids").unwrap().shape(), [8, 2]);
    // The burn device model on the default wgpu adapter (lavapipe in CI) writes the same logits, in
    // both attention forms (MHA with burn's ops, absorbed through nsa's sparse MLA kernel).
    for attention in ["mha", "sparse"] {
        let device_out = dir.join("device.safetensors");
        let run = nsa(&[
            "forward",
            "--input-ids",
            input.to_str().unwrap(),
            "--out",
            device_out.to_str().unwrap(),
            "--device",
            "wgpu",
            "--attention",
            attention,
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
        let device_bytes = std::fs::read(&device_out).unwrap();
        let device_file = safetensors::SafeTensors::deserialize(&device_bytes).unwrap();
        let device_logits = f32s(&device_file, "logits");
        let error = device_logits
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(error <= 1e-3, "device logits ({attention}) max |Δ| {error}");
    }

    // Bad input: a usage error (exit 2) naming the problem, nothing written.
    let bad_ids = dir.join("bad.safetensors");
    write_safetensors(
        &bad_ids,
        &[(
            "input_ids",
            vec![1],
            safetensors::Dtype::I32,
            5000i32.to_le_bytes().to_vec(),
        )],
    );
    let other = dir.join("other.safetensors");
    write_safetensors(
        &other,
        &[("tokens", vec![1], safetensors::Dtype::I32, 5i32.to_le_bytes().to_vec())],
    );
    let o = out.to_str().unwrap();
    for (args, mentions) in [
        (
            vec!["--input-ids", bad_ids.to_str().unwrap(), "--out", o],
            "outside the vocabulary",
        ),
        (
            vec!["--input-ids", other.to_str().unwrap(), "--out", o],
            "no tensor `input_ids`",
        ),
        (
            vec![
                "--input-ids",
                input.to_str().unwrap(),
                "--out",
                o,
                "--attention",
                "dense",
            ],
            "expected mha, sparse or auto",
        ),
        (
            vec![
                "--input-ids",
                input.to_str().unwrap(),
                "--out",
                o,
                "--attention",
                "sparse",
            ],
            "give --device too",
        ),
        (
            vec!["--input-ids", input.to_str().unwrap(), "--out", o, "--dtype", "f16"],
            "expected f32 or bf16",
        ),
        (
            // CI has no CUDA: a clear error from discovery, not burn's panic on the missing driver.
            vec!["--input-ids", input.to_str().unwrap(), "--out", o, "--device", "cuda"],
            "no cuda device 0 on this machine",
        ),
        (
            vec![
                "--input-ids",
                input.to_str().unwrap(),
                "--out",
                o,
                "--model-path",
                "/nonexistent-model",
            ],
            "/nonexistent-model/config.json",
        ),
    ] {
        let output = nsa(&[&["forward"][..], &args].concat());
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(mentions), "{}", stderr(&output));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generate_streams_the_golden_greedy_continuation() {
    let tokenizer = nsa_model::Tokenizer::load(&nsa_model::bundled_model_dir()).unwrap();
    let prompt_ids: Vec<u32> = golden_ids("gen8.prompt_ids").iter().map(|v| *v as u32).collect();
    let greedy: Vec<u32> = golden_ids("gen8.greedy_ids").iter().map(|v| *v as u32).collect();
    let prompt = tokenizer.decode(&prompt_ids).unwrap();
    assert_eq!(
        tokenizer.encode(&prompt).unwrap(),
        prompt_ids,
        "the prompt text re-encodes to the golden ids"
    );
    let run = nsa(&["generate", "--prompt", &prompt, "--max-tokens", "20", "--ignore-eos"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(stdout(&run).trim_end_matches('\n'), tokenizer.decode(&greedy).unwrap());
    assert!(stderr(&run).contains("20 tokens generated"));
    // The same continuation from the burn device model's decode path (wgpu: lavapipe in CI).
    let device = nsa(&[
        "generate",
        "--prompt",
        &prompt,
        "--max-tokens",
        "20",
        "--ignore-eos",
        "--device",
        "wgpu",
    ]);
    assert!(device.status.success(), "{}", stderr(&device));
    assert_eq!(stdout(&device), stdout(&run));
    let missing = nsa(&["generate", "--prompt", "Hello", "--device", "cuda"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("no cuda device 0 on this machine"),
        "{}",
        stderr(&missing)
    );
    // A stop string ends the output before it, also when it spans tokens.
    let full = tokenizer.decode(&greedy).unwrap();
    let at = (full.len() / 2..full.len() - 4)
        .find(|&i| full.as_bytes()[i..i + 4].iter().all(u8::is_ascii_alphanumeric))
        .expect("four letters in a row past the middle");
    let stop = &full[at..at + 4];
    let cut = nsa(&[
        "generate",
        "--prompt",
        &prompt,
        "--max-tokens",
        "20",
        "--ignore-eos",
        "--stop",
        stop,
    ]);
    assert!(cut.status.success(), "{}", stderr(&cut));
    assert_eq!(stdout(&cut).trim_end_matches('\n'), &full[..full.find(stop).unwrap()]);
    // Sampling is reproducible by seed.
    let sampled = |seed: &str| {
        let out = nsa(&[
            "generate",
            "--prompt",
            "Hello",
            "--temperature",
            "0.9",
            "--top-p",
            "0.8",
            "--seed",
            seed,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(sampled("7"), sampled("7"));
    let bad = nsa(&["generate", "--prompt", "Hello", "--top-p", "0"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn bench_layer_times_every_step_and_splits_the_layer() {
    let run = nsa(&[
        "bench-layer",
        "--shape",
        "small",
        "--tokens",
        "8",
        "--contexts",
        "32,64",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = stdout(&run);
    for expected in [
        "context 32:",
        "context 64:",
        "indexer_logits",
        "sparse_mla",
        "moe_experts",
        "split:",
        "tokens/s per layer",
    ] {
        assert!(out.contains(expected), "`{expected}` missing from:\n{out}");
    }
    for group in ["projections", "indexer", "top-k", "attention", "moe"] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(group) && l.contains('%')),
            "{group}:\n{out}"
        );
    }
    // A decode step of a batch over the paged FP8 caches.
    let decode = nsa(&[
        "bench-layer",
        "--shape",
        "small",
        "--phase",
        "decode",
        "--batch",
        "3",
        "--contexts",
        "128",
    ]);
    assert!(decode.status.success(), "{}", stderr(&decode));
    let out = stdout(&decode);
    assert!(
        out.contains("a decode step of 3 sequences") && out.contains("tokens/s per layer"),
        "{out}"
    );
    for (args, mentions) in [
        (vec!["bench-layer", "--phase", "train"], "prefill, decode"),
        (vec!["bench-layer", "--shape", "huge"], "v32, small"),
        (
            vec!["bench-layer", "--shape", "small", "--tokens", "64", "--contexts", "32"],
            "at least --tokens",
        ),
    ] {
        let output = nsa(&args);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(mentions), "{}", stderr(&output));
    }
}

#[test]
fn serve_refuses_flags_for_what_is_not_built() {
    for (args, says) in [
        (&["serve", "--tp", "2"][..], "--tp is not built"),
        (&["serve", "--dp", "2"][..], "data parallelism"),
        (&["serve", "--enable-dp-attention"][..], "data parallelism"),
        (
            &["serve", "--kv-cache-dtype", "fp8_e5m2"][..],
            "--kv-cache-dtype fp8_e5m2 is not built",
        ),
        (
            &["serve", "--nsa-prefill-backend", "tilelang"][..],
            "valid: auto, flashmla_sparse",
        ),
        (&["serve", "--nsa-decode-backend", "fa3"][..], "valid: flashmla_sparse"),
        (&["serve", "--reasoning-parser", "qwen3"][..], "valid: deepseek-v3"),
        (
            &["serve", "--tool-call-parser", "llama3"][..],
            "valid: deepseekv32, deepseekv31",
        ),
        (&["serve", "--page-size", "0"][..], "--page-size must be at least 1"),
        (&["serve", "--load-format", "pt"][..], "--load-format pt is not built"),
        (&["serve", "--dtype", "float16"][..], "--dtype float16 is not built"),
    ] {
        let output = nsa(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(says), "{args:?}: {}", stderr(&output));
    }
    let output = nsa(&["serve", "--device", "host", "--load-format", "dummy"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--load-format dummy needs a device model"),
        "{}",
        stderr(&output)
    );
    let output = nsa(&["serve", "--device", "host", "--dtype", "bfloat16"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--dtype bfloat16 needs a device model"),
        "{}",
        stderr(&output)
    );
    let output = nsa(&["serve", "--device", "host", "--mem-fraction-static", "1.5"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--mem-fraction-static must be in (0, 1]"),
        "{}",
        stderr(&output)
    );
}
