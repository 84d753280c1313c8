//! The template parser and validator: any text gives a template or errors naming
//! file and field, never a panic; a template's steps are in topological order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tasker_engine::template::Template;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Template::from_yaml(text, "fuzz.yaml") {
        Ok(t) => {
            for (i, step) in t.snapshot().steps.iter().enumerate() {
                assert!(step.depends_on.iter().all(|p| p.index() < i));
            }
        }
        Err(errors) => assert!(errors.iter().all(|e| e.file == "fuzz.yaml")),
    }
});
