//! The tuning table and dispatch, without a device: labels, nearest buckets, stale versions, round trips.
use nsa_backends::DeviceFeatures;
use nsa_kernels::find_kernel;
use nsa_kernels::tuning::{
    Choice, DeviceKey, Dispatch, Entry, TuningTable, bucket_of, config_label, kernel_version, parse_label,
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
    }
}

fn device() -> DeviceKey {
    DeviceKey {
        runtime: "wgpu".into(),
        name: "test".into(),
        arch: "cpu".into(),
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
