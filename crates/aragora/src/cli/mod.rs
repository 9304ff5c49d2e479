//! The operator CLI's presentation: typed control-socket answers rendered as
//! the text an operator reads, or the answer's JSON view with `--json`.

pub mod render;
