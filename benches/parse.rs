//! What parsing and validating costs on real data: `codec::parse_json`
//! (JSON text → checked FHIR JSON: syntax, repeated keys, the element walk,
//! fhirbolt's typed model) over the 29 Synthea HIV bundles (38 MB,
//! 16,236 resources), one pass over all of them per iteration; then, on
//! the same data, the stages that strict parsing added or changed: reading
//! JSON text refusing repeated keys (against plain `serde_json`), and the
//! element walk alone.
//!
//!     cargo bench --bench parse
//!
//! Needs `../shared/data` beside the repository.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ehrx::fhir::{codec, json, validate};
use serde_json::Value;

const BUNDLES: &str = "../shared/data/synthea/hiv-transaction-bundles";

fn synthea(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLES);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("../shared/data beside the repository")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let texts: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("readable bundle"))
        .collect();
    let bytes: usize = texts.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("parse");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("synthea_bundles_json", |b| {
        b.iter(|| {
            for t in &texts {
                codec::parse_json(t).expect("a valid bundle");
            }
        })
    });
    group.bench_function("serde_json_from_slice", |b| {
        b.iter(|| {
            for t in &texts {
                serde_json::from_slice::<Value>(t).expect("JSON");
            }
        })
    });
    group.bench_function("json_from_slice_refusing_repeated_keys", |b| {
        b.iter(|| {
            for t in &texts {
                json::from_slice(t).expect("JSON");
            }
        })
    });
    let values: Vec<Value> = texts
        .iter()
        .map(|t| serde_json::from_slice(t).expect("JSON"))
        .collect();
    group.bench_function("element_walk", |b| {
        b.iter(|| {
            for v in &values {
                validate::check_resource(v).expect("a valid bundle");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, synthea);
criterion_main!(benches);
