//! Templates bundled into the binary, so `tasker demo` and a bare `tasker run`
//! work with nothing else installed.

/// `(file name, YAML)` of every bundled template.
pub const TEMPLATES: &[(&str, &str)] = &[
    (
        "examples/order.yaml",
        include_str!("../templates/examples/order.yaml"),
    ),
    (
        "examples/refund.yaml",
        include_str!("../templates/examples/refund.yaml"),
    ),
];
