//! The JSON command decoder: any bytes give a command or an error, never a panic;
//! a command that decodes survives JSON re-encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tasker_engine::codec::{self, JsonFallback};
use tasker_engine::record::{TaskId, Timestamp};

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = codec::decode_json_command(data) {
        let fallback = JsonFallback {
            task_id: TaskId::v7(Timestamp(1), 1),
            at: Timestamp(2),
        };
        let env = cmd.into_envelope(&fallback);
        let json = codec::command_to_json(&env).expect("a command renders as JSON");
        let again = codec::decode_json_command(json.as_bytes()).expect("its JSON decodes");
        assert_eq!(again.into_envelope(&fallback).body, env.body);
    }
});
