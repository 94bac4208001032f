//! Reading a capture file: our `distributor::pcap::Reader` against the `pcap-file` crate's reader on the same bytes (the measured reason in docs/dependencies.md).

use std::hint::black_box;
use std::io::Cursor;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use distributor::pcap::{Reader, Record, Writer};

/// A capture of `n` frames of mixed sizes, in memory.
fn capture(n: usize) -> Vec<u8> {
    let mut w = Writer::new(Vec::new()).expect("writer");
    let sizes = [64usize, 590, 1514, 128];
    for i in 0..n {
        let len = sizes[i % sizes.len()];
        let frame: Vec<u8> = (0..len).map(|b| (b ^ i) as u8).collect();
        w.write(i as u64 * 1_000, len as u32, &frame)
            .expect("write");
    }
    w.into_inner().expect("bytes")
}

fn read(c: &mut Criterion) {
    const N: usize = 10_000;
    let file = capture(N);
    let mut g = c.benchmark_group("capture_read");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("ours", |b| {
        b.iter(|| {
            let mut r = Reader::new(Cursor::new(black_box(&file[..]))).expect("header");
            let mut bytes = 0usize;
            while let Some(rec) = r.next_record().expect("record") {
                bytes += rec.data.len() + rec.ts_ns as usize;
            }
            bytes
        })
    });
    g.bench_function("ours_reused", |b| {
        b.iter(|| {
            let mut r = Reader::new(Cursor::new(black_box(&file[..]))).expect("header");
            let mut rec = Record::default();
            let mut bytes = 0usize;
            while r.next_into(&mut rec).expect("record") {
                bytes += rec.data.len() + rec.ts_ns as usize;
            }
            bytes
        })
    });
    g.bench_function("pcap_file", |b| {
        b.iter(|| {
            let mut r = pcap_file::pcap::PcapReader::new(Cursor::new(black_box(&file[..])))
                .expect("header");
            let mut bytes = 0usize;
            while let Some(p) = r.next_packet() {
                let p = p.expect("record");
                bytes += p.data.len() + p.timestamp.as_nanos() as usize;
            }
            bytes
        })
    });
    g.finish();
}

criterion_group!(benches, read);
criterion_main!(benches);
