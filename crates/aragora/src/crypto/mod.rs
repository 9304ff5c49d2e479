//! Master key, data keys, and the record envelope (issue #8).
