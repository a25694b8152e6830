#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rewind::parser_fuzz::memory_delta(data));
