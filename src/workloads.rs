//! Benchmark workloads as templates of `noop` steps.

use crate::cli::Workload;

pub fn yaml(workload: Workload) -> String {
    let mut out = String::from("namespace: bench\nversion: 1.0.0\n");
    match workload {
        Workload::Diamond => {
            out.push_str("name: diamond\nsteps:\n");
            out.push_str("  - { name: a, handler: noop }\n");
            out.push_str("  - { name: b, handler: noop, depends_on: [a] }\n");
            out.push_str("  - { name: c, handler: noop, depends_on: [a] }\n");
            out.push_str("  - { name: d, handler: noop, depends_on: [b, c] }\n");
        }
        Workload::Chain20 => {
            out.push_str("name: chain20\nsteps:\n  - { name: s0, handler: noop }\n");
            for i in 1..20 {
                out.push_str(&format!(
                    "  - {{ name: s{i}, handler: noop, depends_on: [s{}] }}\n",
                    i - 1
                ));
            }
        }
        Workload::Fanout => {
            out.push_str("name: fanout\nsteps:\n  - { name: root, handler: noop }\n");
            let mut leaves = Vec::new();
            for i in 0..50 {
                out.push_str(&format!(
                    "  - {{ name: leaf{i}, handler: noop, depends_on: [root] }}\n"
                ));
                leaves.push(format!("leaf{i}"));
            }
            out.push_str(&format!(
                "  - {{ name: join, handler: noop, depends_on: [{}] }}\n",
                leaves.join(", ")
            ));
        }
    }
    out
}
