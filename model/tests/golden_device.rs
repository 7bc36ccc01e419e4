//! The device model (burn, f32) against transformers' golden outputs, on the default wgpu device (lavapipe
//! in CI): logits, every layer's residual stream, the indexer's top-k sets and the router's experts.
use burn::tensor::{Device, DeviceKind};
use nsa_model::bundled_model_dir;
use nsa_model::device::DeviceModel;
use nsa_model::reference::ReferenceModel;

#[test]
fn device_prefill_matches_the_reference_and_transformers() {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let model = DeviceModel::load(&bundled_model_dir(), &device).unwrap();
    let reference = ReferenceModel::load(&bundled_model_dir()).unwrap();
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/tiny-v32/golden.safetensors"
    ))
    .unwrap();
    let golden = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for n in [8usize, 40, 100] {
        let view = golden.tensor(&format!("seq{n}.input_ids")).unwrap();
        let ids: Vec<u32> = view
            .data()
            .chunks(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        let ours = model.forward(&ids);
        let theirs = reference.forward(&ids);
        let max_diff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        let error = max_diff(&ours.logits, &theirs.logits);
        assert!(error <= 1e-3, "seq{n}: logits max |Δ| {error:e} against the reference");
        for layer in 0..3 {
            let e = max_diff(&ours.layer_out[layer], &theirs.layer_out[layer]);
            assert!(e <= 1e-3, "seq{n} layer {layer}: residual max |Δ| {e:e}");
        }
        assert_eq!(ours.index_topk, theirs.index_topk, "seq{n}: indexer top-k");
        assert_eq!(ours.router_topk_ids, theirs.router_topk_ids, "seq{n}: router experts");
        eprintln!("seq{n}: device logits max |Δ| {error:.2e}");
    }
}
