//! The event catalog is the code: every record type's JSON form has exactly the
//! fields the catalog lists (checked on the golden fixture of each type), and
//! `docs/events.md` is what the catalog generates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tasker_engine::codec;
use tasker_engine::record::{RecordType, catalog, catalog_markdown, record_json};

fn golden(t: RecordType) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{}.bin", t.name()))
}

#[test]
fn every_record_json_has_exactly_the_catalog_fields() {
    for t in RecordType::ALL {
        let bytes = std::fs::read(golden(*t)).unwrap();
        let env = codec::decode(&bytes).unwrap();
        let json = record_json(&env);
        let obj = json.as_object().unwrap();
        assert_eq!(obj["type"], t.name());
        let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
        let fields = t.all_fields();
        let names: BTreeSet<&str> = fields.iter().map(|f| f.name).collect();
        let unknown: Vec<&&str> = keys.difference(&names).collect();
        assert!(
            unknown.is_empty(),
            "{t}: JSON fields {unknown:?} are not in the catalog (engine/src/record/catalog.rs)"
        );
        for f in fields.iter().filter(|f| !f.optional) {
            assert!(
                keys.contains(f.name),
                "{t}: the catalog's required field `{}` is missing from its JSON {json}",
                f.name
            );
        }
        // Non-null values have the catalog's JSON type.
        for f in &fields {
            let Some(v) = obj.get(f.name).filter(|v| !v.is_null()) else {
                continue;
            };
            let ok = match f.ty {
                "string" => v.is_string(),
                "uuid" => v.as_str().is_some_and(|s| s.len() == 36),
                "integer" | "ms" => v.is_u64(),
                "boolean" => v.is_boolean(),
                "object" => v.is_object(),
                "json" => true,
                list if list.starts_with('[') => v.is_array(),
                other => panic!("unknown catalog type {other}"),
            };
            assert!(ok, "{t}.{}: {v} is not a {}", f.name, f.ty);
        }
    }
    assert_eq!(catalog().len(), RecordType::ALL.len());
}

#[test]
fn docs_events_md_is_generated_from_the_catalog() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/events.md");
    let generated = catalog_markdown();
    if std::env::var("TASKER_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/events.md is stale: it differs from the catalog in engine/src/record/catalog.rs. \
         Regenerate it with `TASKER_BLESS=1 cargo test -p tasker-engine --test catalog` and commit it."
    );
    for t in RecordType::ALL {
        assert!(generated.contains(&format!("### {}", t.name())), "{t}");
    }
}
