//! Table queries: primary-key order, an optional filter, a bounded page, a cursor.

use std::sync::Arc;

use crate::error::AedbError;
use crate::model::state::TableState;
use crate::model::value::{Row, Value};
use crate::txn::snapshot::TableView;

/// A predicate over one row's columns.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    Eq(String, Value),
    Ne(String, Value),
    Lt(String, Value),
    Le(String, Value),
    Gt(String, Value),
    Ge(String, Value),
    IsNull(String),
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
}

/// Rows of one table in primary-key order, `limit` per page.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub filter: Option<Filter>,
    pub limit: usize,
    /// Continue after this point: `next_cursor` of the previous page.
    pub cursor: Option<Vec<u8>>,
}

impl Query {
    pub fn all(limit: usize) -> Self {
        Self {
            filter: None,
            limit,
            cursor: None,
        }
    }

    pub fn filter(mut self, f: Filter) -> Self {
        self.filter = Some(f);
        self
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct QueryResult {
    pub rows: Vec<Arc<Row>>,
    /// Present when more rows may follow; pass it back in `Query::cursor`.
    pub next_cursor: Option<Vec<u8>>,
}

/// Filter with column names resolved to positions once per query.
enum Compiled {
    Cmp(usize, std::cmp::Ordering, bool, Value),
    IsNull(usize),
    And(Vec<Compiled>),
    Or(Vec<Compiled>),
    Not(Box<Compiled>),
}

fn compile(table: &str, t: &TableState, f: &Filter) -> Result<Compiled, AedbError> {
    use std::cmp::Ordering::*;
    let col = |name: &str| {
        t.schema
            .column_index(name)
            .ok_or_else(|| AedbError::Schema {
                table: table.to_string(),
                reason: format!("no column {name:?}"),
            })
    };
    Ok(match f {
        Filter::Eq(c, v) => Compiled::Cmp(col(c)?, Equal, true, v.clone()),
        Filter::Ne(c, v) => Compiled::Cmp(col(c)?, Equal, false, v.clone()),
        Filter::Lt(c, v) => Compiled::Cmp(col(c)?, Less, true, v.clone()),
        Filter::Ge(c, v) => Compiled::Cmp(col(c)?, Less, false, v.clone()),
        Filter::Gt(c, v) => Compiled::Cmp(col(c)?, Greater, true, v.clone()),
        Filter::Le(c, v) => Compiled::Cmp(col(c)?, Greater, false, v.clone()),
        Filter::IsNull(c) => Compiled::IsNull(col(c)?),
        Filter::And(fs) => Compiled::And(
            fs.iter()
                .map(|f| compile(table, t, f))
                .collect::<Result<_, _>>()?,
        ),
        Filter::Or(fs) => Compiled::Or(
            fs.iter()
                .map(|f| compile(table, t, f))
                .collect::<Result<_, _>>()?,
        ),
        Filter::Not(f) => Compiled::Not(Box::new(compile(table, t, f)?)),
    })
}

impl Compiled {
    fn matches(&self, row: &Row) -> bool {
        match self {
            // Comparisons with NULL are false (SQL semantics), in both polarities.
            Compiled::Cmp(i, ord, want, v) => match &row[*i] {
                Value::Null => false,
                x => (x.compare(v) == *ord) == *want,
            },
            Compiled::IsNull(i) => matches!(row[*i], Value::Null),
            Compiled::And(fs) => fs.iter().all(|f| f.matches(row)),
            Compiled::Or(fs) => fs.iter().any(|f| f.matches(row)),
            Compiled::Not(f) => !f.matches(row),
        }
    }
}

pub(crate) fn run_query(
    table: &str,
    view: &TableView<'_>,
    q: &Query,
) -> Result<QueryResult, AedbError> {
    let t = view.state();
    if q.limit == 0 {
        return Err(AedbError::InvalidArgument(
            "query limit must be at least 1".into(),
        ));
    }
    let filter = q
        .filter
        .as_ref()
        .map(|f| compile(table, t, f))
        .transpose()?;
    let mut rows = Vec::new();
    let mut last_key = None;
    for r in view.rows_after(q.cursor.as_deref()) {
        let (k, e) = r?;
        let Some(row) = &e.value else { continue };
        if filter.as_ref().is_none_or(|f| f.matches(row)) {
            if rows.len() == q.limit {
                return Ok(QueryResult {
                    rows,
                    next_cursor: last_key,
                });
            }
            rows.push(row.clone());
            last_key = Some(k.to_vec());
        }
    }
    Ok(QueryResult {
        rows,
        next_cursor: None,
    })
}
