#![no_main]
//! libFuzzer entry point; the harness and its input format are in `src/agent_protocol.rs`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hearth_fuzz::agent_protocol::run(data);
});
