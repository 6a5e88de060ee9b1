#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spliced_fuzz::absolute_uri(data));
