//! `FrameDecoder`: any split of the input gives the same frames, and valid
//! values come out as they went in. See `vmm_core_fuzz::decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_core_fuzz::decoder(data));
