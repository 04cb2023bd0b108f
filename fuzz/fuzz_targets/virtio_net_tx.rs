#![no_main]
//! libFuzzer entry point; the harness and its input format are in `src/virtio_net_tx.rs`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hearth_fuzz::virtio_net_tx::run(data);
});
