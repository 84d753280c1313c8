//! The segment scanner and recovery decision: any bytes give a scan result, never
//! a panic; what it calls valid is whole frames that decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tasker_engine::log::file::{recovery, scan};

fuzz_target!(|data: &[u8]| {
    let s = scan(data);
    assert!(s.valid_len as usize <= data.len().max(tasker_engine::log::file::SEGMENT_HEADER_LEN));
    let _ = recovery(&s, data.len() as u64, true);
    let _ = recovery(&s, data.len() as u64, false);
});
