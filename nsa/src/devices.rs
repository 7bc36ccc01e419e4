use crate::Failure;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let devices = nsa_backends::discover();
    if args.json {
        let infos: Vec<_> = devices.iter().map(|d| &d.info).collect();
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(());
    }
    if devices.is_empty() {
        println!("no devices found (runtimes compiled in: cuda, hip, wgpu)");
        return Ok(());
    }
    println!(
        "{:<8} {:<36} {:<12} {:>10}  features",
        "device", "name", "arch", "memory"
    );
    for device in &devices {
        let info = &device.info;
        let f = &info.features;
        let memory = info.memory_bytes.map_or("-".to_string(), |b| {
            format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
        });
        let mut features = vec![format!(
            "plane={}",
            if f.plane_ops {
                f.plane_size.to_string()
            } else {
                "no".into()
            }
        )];
        for (name, on) in [
            ("tensor-cores", f.tensor_cores),
            ("cmma-bf16", f.cmma_bf16),
            ("mma-m16n8k16", f.mma_m16n8k16_bf16),
            ("wgmma", f.wgmma),
            ("tma", f.tma),
            ("bf16", f.bf16),
            ("fp8", f.fp8),
        ] {
            features.push(format!("{name}={}", if on { "yes" } else { "no" }));
        }
        features.push(format!("smem={}KiB", f.max_shared_memory / 1024));
        if let Some(sms) = f.multiprocessors {
            features.push(format!("sms={sms}"));
        }
        if let Some(driver) = &info.driver {
            features.push(format!("driver=\"{driver}\""));
        }
        println!(
            "{:<8} {:<36} {:<12} {:>10}  {}",
            info.id(),
            info.name,
            info.arch,
            memory,
            features.join(" ")
        );
    }
    let best = &devices[0].info;
    println!("\ndefault (--device auto): {}", best.id());
    Ok(())
}
