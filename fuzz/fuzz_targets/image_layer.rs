#![no_main]
//! libFuzzer entry point; the harness and its input format are in `src/image_layer.rs`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hearth_fuzz::image_layer::run(data);
});
