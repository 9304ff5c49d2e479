//! Typed column values, table schemas, and the order-preserving primary-key encoding.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::AedbError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ColumnType {
    Bool,
    Int,
    Float,
    Text,
    Bytes,
    /// Seconds since the Unix epoch, UTC.
    Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(#[serde(with = "serde_bytes_vec")] Vec<u8>),
    Timestamp(i64),
}

impl Value {
    pub fn column_type(&self) -> Option<ColumnType> {
        Some(match self {
            Value::Null => return None,
            Value::Bool(_) => ColumnType::Bool,
            Value::Int(_) => ColumnType::Int,
            Value::Float(_) => ColumnType::Float,
            Value::Text(_) => ColumnType::Text,
            Value::Bytes(_) => ColumnType::Bytes,
            Value::Timestamp(_) => ColumnType::Timestamp,
        })
    }

    pub(crate) fn encoded_len_hint(&self) -> usize {
        match self {
            Value::Text(s) => s.len() + 2,
            Value::Bytes(b) => b.len() + 2,
            _ => 9,
        }
    }

    /// Total order used by filters: values of different types order by type tag.
    pub(crate) fn compare(&self, other: &Value) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) | (Value::Timestamp(a), Value::Timestamp(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Text(a), Value::Text(b)) => a.cmp(b),
            (Value::Bytes(a), Value::Bytes(b)) => a.cmp(b),
            (Value::Null, Value::Null) => Ordering::Equal,
            _ => self.tag().cmp(&other.tag()),
        }
    }

    fn tag(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) => 2,
            Value::Float(_) => 3,
            Value::Text(_) => 4,
            Value::Bytes(_) => 5,
            Value::Timestamp(_) => 6,
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ColumnType::Bool => "bool",
            ColumnType::Int => "int",
            ColumnType::Float => "float",
            ColumnType::Text => "text",
            ColumnType::Bytes => "bytes",
            ColumnType::Timestamp => "timestamp",
        };
        f.write_str(s)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    pub nullable: bool,
}

impl Column {
    pub fn new(name: impl Into<String>, ty: ColumnType) -> Self {
        Self {
            name: name.into(),
            ty,
            nullable: false,
        }
    }

    pub fn nullable(mut self) -> Self {
        self.nullable = true;
        self
    }
}

/// Columns in row order, and the columns (in key order) forming the primary key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
}

/// A row: one value per schema column, in column order.
pub type Row = Vec<Value>;

impl TableSchema {
    pub fn new(columns: Vec<Column>, primary_key: Vec<String>) -> Self {
        Self {
            columns,
            primary_key,
        }
    }

    pub(crate) fn validate(&self, table: &str, max_name: usize) -> Result<(), AedbError> {
        let err = |reason: String| AedbError::Schema {
            table: table.to_string(),
            reason,
        };
        if self.columns.is_empty() {
            return Err(err("a table needs at least one column".into()));
        }
        if self.columns.len() > 1024 {
            return Err(err(format!("{} columns, at most 1024", self.columns.len())));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.columns {
            crate::model::validate_name("column", &c.name, max_name)?;
            if !seen.insert(c.name.as_str()) {
                return Err(err(format!("column {:?} declared twice", c.name)));
            }
        }
        if self.primary_key.is_empty() {
            return Err(err("a primary key needs at least one column".into()));
        }
        let mut pk_seen = std::collections::HashSet::new();
        for k in &self.primary_key {
            let col = self
                .columns
                .iter()
                .find(|c| &c.name == k)
                .ok_or_else(|| err(format!("primary key column {k:?} is not a column")))?;
            if !pk_seen.insert(k.as_str()) {
                return Err(err(format!("primary key names {k:?} twice")));
            }
            if col.nullable {
                return Err(err(format!("primary key column {k:?} cannot be nullable")));
            }
            if col.ty == ColumnType::Float {
                return Err(err(format!(
                    "primary key column {k:?} cannot be float (no total equality)"
                )));
            }
        }
        Ok(())
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Checks arity, types and nullability of a full row.
    pub(crate) fn check_row(&self, table: &str, row: &[Value]) -> Result<(), AedbError> {
        if row.len() != self.columns.len() {
            return Err(AedbError::Schema {
                table: table.to_string(),
                reason: format!(
                    "row has {} values, table has {} columns",
                    row.len(),
                    self.columns.len()
                ),
            });
        }
        for (c, v) in self.columns.iter().zip(row) {
            check_value(table, c, v)?;
        }
        Ok(())
    }

    /// Extracts and encodes the primary key of a full, checked row.
    pub(crate) fn row_key(&self, row: &[Value]) -> Vec<u8> {
        let mut out = Vec::new();
        for k in &self.primary_key {
            if let Some(i) = self.column_index(k) {
                encode_key_part(&mut out, &row[i]);
            }
        }
        out
    }

    /// Checks and encodes a primary key given as values in key-column order.
    pub(crate) fn encode_pk(&self, table: &str, pk: &[Value]) -> Result<Vec<u8>, AedbError> {
        if pk.len() != self.primary_key.len() {
            return Err(AedbError::Schema {
                table: table.to_string(),
                reason: format!(
                    "primary key has {} columns, {} values given",
                    self.primary_key.len(),
                    pk.len()
                ),
            });
        }
        let mut out = Vec::new();
        for (name, v) in self.primary_key.iter().zip(pk) {
            let col = self
                .columns
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| AedbError::Schema {
                    table: table.to_string(),
                    reason: format!("primary key column {name:?} missing"),
                })?;
            check_value(table, col, v)?;
            encode_key_part(&mut out, v);
        }
        Ok(out)
    }
}

fn check_value(table: &str, c: &Column, v: &Value) -> Result<(), AedbError> {
    match v.column_type() {
        None if c.nullable => Ok(()),
        None => Err(AedbError::Schema {
            table: table.to_string(),
            reason: format!("column {:?} is not nullable", c.name),
        }),
        Some(t) if t == c.ty => Ok(()),
        Some(t) => Err(AedbError::Schema {
            table: table.to_string(),
            reason: format!("column {:?} is {}, value is {}", c.name, c.ty, t),
        }),
    }
}

/// Memcomparable encoding: byte order of encoded keys equals value order.
fn encode_key_part(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::Int(i) | Value::Timestamp(i) => {
            out.extend_from_slice(&((*i as u64) ^ (1 << 63)).to_be_bytes())
        }
        Value::Text(s) => encode_escaped(out, s.as_bytes()),
        Value::Bytes(b) => encode_escaped(out, b),
        // Rejected by schema validation before encoding.
        Value::Null | Value::Float(_) => {}
    }
}

/// 0x00 is escaped as 0x00 0xFF and the part ends with 0x00 0x01, so a shorter
/// string sorts before any extension of it.
fn encode_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        super::super::bytes::deserialize_vec(d)
    }
}
