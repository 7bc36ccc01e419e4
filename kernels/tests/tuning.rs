//! The tuning table and dispatch, without a device: labels, nearest buckets, stale versions, round trips.
use nsa_backends::DeviceFeatures;
use nsa_kernels::find_kernel;
use nsa_kernels::strategy::{STRATEGIES, find_strategy, strategy_version, table_name};
use nsa_kernels::tuning::{
    Choice, DeviceKey, Dispatch, Entry, TuningTable, bucket_of, config_label, kernel_version, parse_label,
    version_text, without_entry_hashes,
};

fn features() -> DeviceFeatures {
    // A wgpu-like device: no plane ops, no tensor cores, so only the scalar variants are supported.
    DeviceFeatures {
        plane_ops: false,
        plane_size: 32,
        tensor_cores: false,
        tma: false,
        bf16: false,
        fp8: false,
        max_shared_memory: 48 * 1024,
        max_units_per_cube: 256,
        multiprocessors: None,
        cmma_bf16: false,
        mma_m16n8k16_bf16: false,
        wgmma: false,
    }
}

fn device() -> DeviceKey {
    DeviceKey {
        runtime: "wgpu".into(),
        name: "test".into(),
        arch: "cpu".into(),
        driver: String::new(),
    }
}

#[test]
fn labels_round_trip() {
    assert_eq!(config_label("mma_h64", &[]), "mma_h64");
    let label = config_label("mma_h64", &[("num_splits", 4.0)]);
    assert_eq!(label, "mma_h64[num_splits=4]");
    assert_eq!(parse_label(&label), ("mma_h64", vec![("num_splits".to_string(), 4.0)]));
    assert_eq!(parse_label("simt_h8"), ("simt_h8", vec![]));
}

#[test]
fn dispatch_picks_the_nearest_bucket_and_ignores_stale_versions() {
    let kernel = find_kernel("mla_decode").unwrap();
    let version = kernel_version(kernel);
    let problems = kernel.problems();
    let (small, large) = (&problems[0], &problems[3]);
    let entry = |problem, best: &str, version: &str| Entry {
        kernel: kernel.name().into(),
        version: version.into(),
        format: format!("{}", problems[0].format),
        bucket: bucket_of(problem),
        times_ms: [(best.to_string(), 1.0), ("simt_h16".to_string(), 2.0)]
            .into_iter()
            .collect(),
        best: best.into(),
    };
    let mut table = TuningTable::new(device());
    table.entries.push(entry(small, "simt_h8[num_splits=4]", &version));
    table.entries.push(entry(large, "simt_h16", &version));
    let path = std::env::temp_dir().join(format!("nsa-tuning-test-{}.json", std::process::id()));
    table.save(&path).unwrap();
    assert_eq!(TuningTable::load(&path).unwrap(), table);

    let (dispatch, warning) = Dispatch::load(&path, &device());
    assert!(warning.is_none());
    let pick = dispatch.choose(kernel, small, &features()).unwrap();
    assert_eq!((pick.variant.name, pick.choice), ("simt_h8", Choice::Tuned));
    assert_eq!(pick.apply(small).param("num_splits"), 4.0);
    assert_eq!(
        dispatch.choose(kernel, large, &features()).unwrap().variant.name,
        "simt_h16"
    );

    // Measured for another version of the kernel: the default variant.
    let mut stale = TuningTable::new(device());
    stale.entries.push(entry(small, "simt_h8", "0000000000000000"));
    stale.save(&path).unwrap();
    let (dispatch, _) = Dispatch::load(&path, &device());
    let pick = dispatch.choose(kernel, small, &features()).unwrap();
    assert_eq!(pick.choice, Choice::Default);
    assert_eq!(
        pick.variant.name,
        kernel
            .variants()
            .iter()
            .find(|v| v.name.starts_with("simt"))
            .unwrap()
            .name
    );

    // A new measurement of the bucket replaces the older version's entry; other buckets stay.
    stale.entries.push(entry(large, "simt_h16", "0000000000000000"));
    stale.entry_or_insert(kernel.name(), &version, small).best = "simt_h16".into();
    assert_eq!(stale.entries.len(), 2);
    assert!(
        stale
            .entries
            .iter()
            .any(|e| e.version == version && e.bucket == bucket_of(small))
    );
    assert!(
        stale
            .entries
            .iter()
            .any(|e| e.version != version && e.bucket == bucket_of(large))
    );

    // Another device's table: the defaults and a warning naming both devices.
    let (_, warning) = Dispatch::load(
        &path,
        &DeviceKey {
            name: "other".into(),
            ..device()
        },
    );
    assert!(warning.unwrap().contains("not on this device"));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn strategies_follow_sglang_rules_without_a_table_and_the_measurement_with_one() {
    let prefill = find_strategy("nsa_prefill_backend").unwrap();
    let shape = |q: usize, kv: usize| {
        let mut shape = prefill.grid(false).remove(0);
        for (name, size) in &mut shape.dims {
            match *name {
                "q" => *size = q,
                "kv" => *size = kv,
                _ => {}
            }
        }
        shape
    };
    // SGLang: flashmla_sparse while total_kv < total_q · 512.
    let defaults = Dispatch::defaults();
    assert_eq!(
        defaults.decide(prefill, &shape(16, 8191)),
        ("flashmla_sparse", Choice::Default)
    );
    assert_eq!(
        defaults.decide(prefill, &shape(16, 8192)),
        ("flashmla_kv", Choice::Default)
    );
    let mha = find_strategy("strategy:mha_one_shot").unwrap();
    let mut short = mha.grid(false).remove(0);
    assert!(short.dim("kv") <= 2048);
    assert_eq!(defaults.decide(mha, &short), ("mha_one_shot", Choice::Default));
    short.dims.iter_mut().find(|(n, _)| *n == "kv").unwrap().1 = 2049;
    assert_eq!(defaults.decide(mha, &short).0, "sparse");

    // Every option's plan is a chain of valid launches at every bucket of both grids.
    for strategy in STRATEGIES {
        for tiny in [false, true] {
            for shape in strategy.grid(tiny) {
                for option in strategy.options() {
                    let plan = strategy.plan(option, &shape);
                    assert!(!plan.is_empty());
                    for step in plan {
                        step.kernel.validate(&step.problem).unwrap();
                    }
                }
            }
        }
    }

    // A table that measured flashmla_kv faster at (16, 8192) · (1024, 8192): the nearest bucket decides.
    let mut table = TuningTable::new(device());
    let version = strategy_version(prefill);
    for (q, best, other) in [
        (16, "flashmla_kv", "flashmla_sparse"),
        (1024, "flashmla_kv", "flashmla_sparse"),
    ] {
        table.entries.push(Entry {
            kernel: table_name(prefill),
            version: version.clone(),
            format: "bf16".into(),
            bucket: bucket_of(&shape(q, 8192)),
            times_ms: [(best.to_string(), 1.0), (other.to_string(), 3.0)]
                .into_iter()
                .collect(),
            best: best.into(),
        });
    }
    let path = std::env::temp_dir().join(format!("nsa-strategy-test-{}.json", std::process::id()));
    table.save(&path).unwrap();
    let (dispatch, warning) = Dispatch::load(&path, &device());
    assert!(warning.is_none());
    // The rule says flashmla_sparse at (900, 8192); the measurement says flashmla_kv.
    assert_eq!(
        dispatch.decide(prefill, &shape(900, 8192)),
        ("flashmla_kv", Choice::Tuned)
    );
    // A strategy the table never measured keeps its rule.
    assert_eq!(dispatch.decide(mha, &short), ("sparse", Choice::Default));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn the_version_covers_variants_that_lack_the_first_format() {
    // Sparse MLA's tensor-core variants take bf16 only, the kernel lists f32 first: their code must still
    // be hashed, or a changed wgmma kernel would inherit the old one's measurements.
    let kernel = find_kernel("sparse_mla_prefill").unwrap();
    assert_eq!(kernel.formats().first(), Some(&nsa_dsl::Format::F32));
    let text = version_text(kernel);
    assert!(
        text.contains("wgmma.mma_async"),
        "the wgmma variants' CUDA is not in the version"
    );
    assert!(
        text.contains("bar.arrive"),
        "wgmma_h64_pair's CUDA is not in the version"
    );
}

#[test]
fn the_version_ignores_the_entry_name_hash_and_nothing_else() {
    // CubeCL names an entry point after the kernel's type id, which differs between builds of the same
    // code (checkout path, test or binary crate): a version including it made every table stale elsewhere.
    let a = "__global__ void rms_norm_kernel_n_4_fead24a2(uint32_t_4 const* v0) { x_1 = 0xdeadbeef; }";
    let b = "__global__ void rms_norm_kernel_n_4_368ec926(uint32_t_4 const* v0) { x_1 = 0xdeadbeef; }";
    assert_eq!(without_entry_hashes(a), without_entry_hashes(b));
    assert!(without_entry_hashes(a).contains("rms_norm_kernel_n_4_<hash>("));
    // Code, literals and names that merely look alike stay.
    let c = "__global__ void rms_norm_kernel_n_4_368ec926(uint32_t_4 const* v0) { x_1 = 0xdeadbeee; }";
    assert_ne!(without_entry_hashes(b), without_entry_hashes(c));
    for kept in ["v_0123abcd_x", "V_0123ABCD(", "a_0123abc(", "0xdeadbeef", "_0123abcd("] {
        assert_eq!(without_entry_hashes(kept), kept);
    }
    let text = version_text(find_kernel("rms_norm").unwrap());
    assert!(
        text.contains("_<hash>"),
        "the entry names in the version are not normalized"
    );
}
