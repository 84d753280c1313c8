//! The bincode record decoder: any bytes give a record or an error, never a
//! panic; a record that decodes re-encodes to bytes that decode to it again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tasker_engine::codec;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = codec::decode(data) {
        let bytes = codec::encode(&env).expect("a decoded record encodes");
        assert_eq!(codec::decode(&bytes).expect("re-decodes"), env);
    }
});
