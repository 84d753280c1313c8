//! `tasker events`: the record catalog (types, kinds, fields, meanings), from the
//! same code that writes `docs/events.md`.

use tasker_engine::record::{Field, catalog};

use crate::cli::Cli;

pub fn events(cli: &Cli) -> anyhow::Result<()> {
    let entries = catalog();
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    for e in &entries {
        println!("{:26} {:8} {}", e.name, e.kind, e.meaning);
        let own = tasker_engine::record::RecordType::from_name(e.name)
            .map(|t| t.fields())
            .unwrap_or_default();
        for f in own {
            println!("    {:18} {:18} {}", f.name, field_type(f), f.doc);
        }
    }
    println!();
    println!(
        "every record also has: type, task_id, correlation_id, at; events and control records: epoch, source_position"
    );
    println!(
        "`tasker events --json` lists every field of every type; docs/events.md is the same catalog"
    );
    Ok(())
}

fn field_type(f: &Field) -> String {
    if f.optional {
        format!("{}?", f.ty)
    } else {
        f.ty.to_owned()
    }
}
