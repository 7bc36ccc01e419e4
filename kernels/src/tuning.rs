//! The tuning table `nsa autotune` writes and dispatch reads: per device, per kernel version, the measured
//! time of every variant on a grid of shape buckets, and the fastest.
//!
//! JSON: `{"format": "nsa-tuning-1", "device": {runtime, name, arch, driver}, "entries": [{kernel, version, format,
//! bucket: {dim: size}, times_ms: {variant: ms}, best}]}`. A kernel's version is a hash of its generated
//! code, so a table measured before a kernel changed is not applied to the new code.
use crate::strategy::{Strategy, strategy_version, table_name};
use crate::{Kernel, Problem, Variant};
use nsa_backends::{DeviceInfo, IrTarget};
use nsa_dsl::Format;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const TABLE_FORMAT: &str = "nsa-tuning-1";

/// What a table was measured on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKey {
    pub runtime: String,
    pub name: String,
    pub arch: String,
    /// Empty where the runtime does not say (wgpu, HIP for now).
    #[serde(default)]
    pub driver: String,
}

impl DeviceKey {
    pub fn of(info: &DeviceInfo) -> DeviceKey {
        DeviceKey {
            runtime: info.runtime.to_string(),
            name: info.name.clone(),
            arch: info.arch.clone(),
            driver: info.driver.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.arch, self.runtime)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        write!(f, ")")
    }
}

/// One kernel at one shape bucket: every measured variant's median time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub kernel: String,
    pub version: String,
    pub format: String,
    pub bucket: BTreeMap<String, usize>,
    pub times_ms: BTreeMap<String, f64>,
    pub best: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuningTable {
    pub format: String,
    pub device: DeviceKey,
    /// How long each timed batch of back-to-back launches ran, in ms: 20 stays near the GPU's full clock,
    /// 200 reaches its power cap as sustained serving does (the H200's SM clock falls ~25%). Tables from
    /// before the field were measured with [`DEFAULT_BATCH_MS`].
    #[serde(default = "default_batch_ms")]
    pub batch_ms: f64,
    pub entries: Vec<Entry>,
}

/// The batch length `nsa autotune` measures with unless told otherwise.
pub const DEFAULT_BATCH_MS: f64 = 20.0;

fn default_batch_ms() -> f64 {
    DEFAULT_BATCH_MS
}

#[derive(Debug, thiserror::Error)]
pub enum TuningError {
    #[error("cannot read tuning table {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path} is not an nsa tuning table ({reason})")]
    NotATable { path: String, reason: String },
    #[error("{path} has table format `{found}`; this nsa reads `{TABLE_FORMAT}` (run `nsa autotune` again)")]
    WrongFormat { path: String, found: String },
    #[error("{path} was measured on {table}, not on this device, {device}")]
    ForeignDevice {
        path: String,
        table: Box<DeviceKey>,
        device: Box<DeviceKey>,
    },
}

impl TuningTable {
    pub fn new(device: DeviceKey) -> TuningTable {
        TuningTable {
            format: TABLE_FORMAT.into(),
            device,
            batch_ms: DEFAULT_BATCH_MS,
            entries: Vec::new(),
        }
    }

    /// Reads a table, rejecting anything that is not one of ours.
    pub fn load(path: &Path) -> Result<TuningTable, TuningError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TuningError::Io {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| TuningError::NotATable {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        match value.get("format").and_then(|f| f.as_str()) {
            Some(TABLE_FORMAT) => {}
            Some(other) => {
                return Err(TuningError::WrongFormat {
                    path: shown,
                    found: other.into(),
                });
            }
            None => {
                return Err(TuningError::NotATable {
                    path: shown,
                    reason: "no \"format\" field".into(),
                });
            }
        }
        serde_json::from_value(value).map_err(|e| TuningError::NotATable {
            path: shown,
            reason: e.to_string(),
        })
    }

    /// Loads a table for `device`: a table of another device is an error.
    pub fn load_for(path: &Path, device: &DeviceKey) -> Result<TuningTable, TuningError> {
        let table = TuningTable::load(path)?;
        if &table.device != device {
            return Err(TuningError::ForeignDevice {
                path: path.display().to_string(),
                table: Box::new(table.device),
                device: Box::new(device.clone()),
            });
        }
        Ok(table)
    }

    /// Writes the table (through a temporary file, so an interrupted write never leaves half a table).
    pub fn save(&self, path: &Path) -> Result<(), TuningError> {
        let io = |e: std::io::Error| TuningError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("a table serializes");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The entry for this kernel version, format and exact bucket.
    pub fn entry_mut(&mut self, kernel: &str, version: &str, problem: &Problem) -> Option<&mut Entry> {
        let bucket = bucket_of(problem);
        let format = problem.format.to_string();
        self.entries
            .iter_mut()
            .find(|e| e.kernel == kernel && e.version == version && e.format == format && e.bucket == bucket)
    }

    /// The entry for this kernel version, format and bucket, created empty when missing; a new entry replaces
    /// the bucket's entries measured on an older version of the kernel.
    pub fn entry_or_insert(&mut self, kernel: &str, version: &str, problem: &Problem) -> &mut Entry {
        if self.entry_mut(kernel, version, problem).is_none() {
            let (format, bucket) = (problem.format.to_string(), bucket_of(problem));
            self.entries
                .retain(|e| !(e.kernel == kernel && e.format == format && e.bucket == bucket));
            self.entries.push(Entry {
                kernel: kernel.into(),
                version: version.into(),
                format: problem.format.to_string(),
                bucket: bucket_of(problem),
                times_ms: Default::default(),
                best: String::new(),
            });
        }
        self.entry_mut(kernel, version, problem).expect("just inserted")
    }

    /// The fastest variant measured at the bucket nearest `problem` (distance: Σ |log₂ size − log₂ size'|
    /// over the dims), for this kernel version and format; None when the table has nothing for it.
    pub fn choose(&self, kernel: &str, version: &str, problem: &Problem) -> Option<&str> {
        let format = problem.format.to_string();
        let distance = |entry: &Entry| -> f64 {
            problem
                .dims
                .iter()
                .map(|(name, size)| {
                    let other = entry.bucket.get(*name).copied().unwrap_or(1).max(1);
                    (((*size).max(1) as f64).log2() - (other as f64).log2()).abs()
                })
                .sum()
        };
        self.entries
            .iter()
            .filter(|e| e.kernel == kernel && e.version == version && e.format == format && !e.best.is_empty())
            .min_by(|a, b| distance(a).total_cmp(&distance(b)))
            .map(|e| e.best.as_str())
    }
}

/// A problem's bucket: its dims by name.
pub fn bucket_of(problem: &Problem) -> BTreeMap<String, usize> {
    problem.dims.iter().map(|(n, s)| (n.to_string(), *s)).collect()
}

/// The kernel's version: an FNV-1a hash of its variants' generated code (CUDA, else WGSL; names alone for a
/// kernel without IR of its own), so a changed kernel does not inherit old measurements.
pub fn kernel_version(kernel: &dyn Kernel) -> String {
    fnv1a(version_text(kernel).as_bytes())
}

/// What [`kernel_version`] hashes: the kernel's name, then each variant's name and code, generated for the
/// first of the kernel's formats the variant supports (a bf16-only tensor-core variant is covered too).
pub fn version_text(kernel: &dyn Kernel) -> String {
    let mut text = kernel.name().to_string();
    let formats = match kernel.formats() {
        [] => vec![Format::F32],
        formats => formats.to_vec(),
    };
    for variant in kernel.variants() {
        text.push_str(variant.name);
        let code = formats.iter().find_map(|&format| {
            [IrTarget::Cuda, IrTarget::Wgsl]
                .into_iter()
                .find(|t| kernel.supports_target(variant, *t) && kernel.supports_format(variant, format))
                .map(|target| (target, format))
        });
        if let Some((target, format)) = code
            && let Ok(source) = crate::ir::emit(kernel, variant, target, &kernel.ir_problem(format))
        {
            text.push_str(&without_entry_hashes(&source));
        }
    }
    text
}

/// `source` with the hash CubeCL appends to each entry point's name (`…_kernel_n_4_fead24a2`) replaced by
/// `<hash>`: it comes from the kernel's type id, which moves with the build (checkout path, test or binary
/// crate), so a version including it made a table measured by one build stale in every other.
pub fn without_entry_hashes(source: &str) -> String {
    let bytes = source.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = String::with_capacity(source.len());
    let mut copied = 0;
    let mut i = 1;
    while i + 9 <= bytes.len() {
        let hash = &bytes[i + 1..i + 9];
        let before = bytes[i - 1];
        if bytes[i] == b'_'
            && (before.is_ascii_lowercase() || before.is_ascii_digit())
            && hash.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            && bytes.get(i + 9).is_none_or(|b| !word(*b))
        {
            out.push_str(&source[copied..i + 1]);
            out.push_str("<hash>");
            copied = i + 9;
            i += 9;
        } else {
            i += 1;
        }
    }
    out.push_str(&source[copied..]);
    out
}

/// FNV-1a, 64-bit, as 16 hex digits.
pub fn fnv1a(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, b| {
        (hash ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The variant dispatch uses without a table entry: the kernel's first variant this device supports for
/// the problem (each family lists its fastest first).
pub fn default_variant(
    kernel: &dyn Kernel,
    problem: &Problem,
    features: &nsa_backends::DeviceFeatures,
) -> Option<&'static Variant> {
    kernel
        .variants()
        .iter()
        .find(|v| kernel.supports(v, problem, features).is_ok())
}

/// A measured configuration's name in a table: the variant, then `[name=value,...]` for tuned parameters
/// (`mma_h64[num_splits=4]`); the bare variant name means the problem's own parameters (the fixed rule).
pub fn config_label(variant: &str, params: &[(&str, f64)]) -> String {
    if params.is_empty() {
        return variant.to_string();
    }
    let list: Vec<String> = params.iter().map(|(n, v)| format!("{n}={v}")).collect();
    format!("{variant}[{}]", list.join(","))
}

/// The variant and parameters of a configuration label (unparsable parameters are dropped).
pub fn parse_label(label: &str) -> (&str, Vec<(String, f64)>) {
    match label.split_once('[') {
        Some((variant, rest)) => {
            let params = rest
                .trim_end_matches(']')
                .split(',')
                .filter_map(|kv| {
                    let (n, v) = kv.split_once('=')?;
                    Some((n.to_string(), v.parse().ok()?))
                })
                .collect();
            (variant, params)
        }
        None => (label, Vec::new()),
    }
}

/// What dispatch picked: a variant, parameter overrides (tuned split counts and the like) and whether it
/// came from the table.
#[derive(Clone, Debug)]
pub struct Pick {
    pub variant: &'static Variant,
    pub params: Vec<(String, f64)>,
    pub choice: Choice,
}

impl Pick {
    /// `problem` with the picked parameters applied.
    pub fn apply(&self, problem: &Problem) -> Problem {
        let mut problem = problem.clone();
        for (name, value) in &self.params {
            problem.set_param(name, *value);
        }
        problem
    }
}

/// Variant choice on one device: the table's fastest at the nearest bucket when it has the kernel (at its
/// current version), else [`default_variant`]. Never fails: a missing, corrupt, old-format or foreign table
/// gives the defaults and a warning.
pub struct Dispatch {
    table: Option<TuningTable>,
    versions: std::sync::Mutex<BTreeMap<String, String>>,
}

/// Where a dispatched variant came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Tuned,
    Default,
}

impl Dispatch {
    pub fn defaults() -> Dispatch {
        Dispatch {
            table: None,
            versions: Default::default(),
        }
    }

    /// The table at `path` for `device`, or the defaults and why not.
    pub fn load(path: &Path, device: &DeviceKey) -> (Dispatch, Option<String>) {
        match TuningTable::load_for(path, device) {
            Ok(table) => (
                Dispatch {
                    table: Some(table),
                    versions: Default::default(),
                },
                None,
            ),
            Err(error) => (
                Dispatch::defaults(),
                Some(format!("{error}; using the default variants")),
            ),
        }
    }

    pub fn choose(
        &self,
        kernel: &dyn Kernel,
        problem: &Problem,
        features: &nsa_backends::DeviceFeatures,
    ) -> Option<Pick> {
        if let Some(table) = &self.table {
            let version = self
                .versions
                .lock()
                .expect("version cache")
                .entry(kernel.name().to_string())
                .or_insert_with(|| kernel_version(kernel))
                .clone();
            if let Some(label) = table.choose(kernel.name(), &version, problem) {
                let (name, params) = parse_label(label);
                if let Some(variant) = kernel.variants().iter().find(|v| v.name == name)
                    && kernel.supports(variant, problem, features).is_ok()
                {
                    return Some(Pick {
                        variant,
                        params,
                        choice: Choice::Tuned,
                    });
                }
            }
        }
        default_variant(kernel, problem, features).map(|variant| Pick {
            variant,
            params: Vec::new(),
            choice: Choice::Default,
        })
    }

    /// A strategy's option at `shape`: the table's fastest at the nearest measured bucket (at the current
    /// versions of the kernels it launches), else SGLang's rule.
    pub fn decide(&self, strategy: &dyn Strategy, shape: &Problem) -> (&'static str, Choice) {
        if let Some(table) = &self.table {
            let name = table_name(strategy);
            let version = self
                .versions
                .lock()
                .expect("version cache")
                .entry(name.clone())
                .or_insert_with(|| strategy_version(strategy))
                .clone();
            if let Some(label) = table.choose(&name, &version, shape)
                && let Some(option) = strategy.options().iter().find(|o| **o == label)
            {
                return (option, Choice::Tuned);
            }
        }
        (strategy.rule(shape), Choice::Default)
    }
}
