//! `Request::from_value`, `params::parse` and the validators: no panic, and
//! no error message repeats a value. See `vmm_core_fuzz::validation`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_core_fuzz::validation(data));
