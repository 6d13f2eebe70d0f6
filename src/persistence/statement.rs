//! Hand-written SQL that diesel keeps prepared.
//!
//! `diesel::sql_query` is never cached, and neither is a multi-row `insert_into(…).values(&vec)`
//! (its SQL depends on the row count): on PostgreSQL each execution is a parse round trip
//! plus an execute round trip, and on SQLite a fresh parse. The few statements the query
//! builder cannot express (`UPDATE … RETURNING`, `INSERT … SELECT … FROM unnest`, upserts that
//! return) are written as a [`Statement`]: fixed SQL pieces with typed binds between them and
//! a marker type per statement, which gives diesel a static query id to cache the prepared
//! statement under. Binds are written with `push_bind_param`, so each backend gets its own
//! placeholder syntax.

use std::marker::PhantomData;

use diesel::expression::expression_types::Untyped;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Nullable, Text, Timestamp};
use diesel::sqlite::Sqlite;
use diesel::{QueryResult, result::Error};

use super::ids::UuidText;

/// One bind value.
#[derive(Debug)]
pub(crate) enum Bind<'a> {
    BigInt(i64),
    OptBigInt(Option<i64>),
    Int(i32),
    Double(f64),
    Bool(bool),
    Text(&'a str),
    OptText(Option<&'a str>),
    /// A UUID id as its stored text.
    Uuid(UuidText),
    /// A UUID id as its stored text, or `NULL`.
    OptUuid(Option<UuidText>),
    Timestamp(chrono::NaiveDateTime),
    OptTimestamp(Option<chrono::NaiveDateTime>),
    /// PostgreSQL only.
    Texts(Vec<&'a str>),
    /// PostgreSQL only.
    OptTexts(Vec<Option<&'a str>>),
    /// PostgreSQL only: UUID ids as `text[]`.
    Uuids(Vec<UuidText>),
    /// PostgreSQL only: UUID ids or `NULL`s as `text[]`.
    OptUuids(Vec<Option<UuidText>>),
    /// PostgreSQL only.
    Floats(Vec<f64>),
    /// PostgreSQL only.
    Timestamps(Vec<chrono::NaiveDateTime>),
    /// PostgreSQL only.
    OptTimestamps(Vec<Option<chrono::NaiveDateTime>>),
    /// PostgreSQL only.
    Ints(Vec<i32>),
    /// PostgreSQL only.
    OptInts(Vec<Option<i32>>),
}

/// A statement: `parts[0] bind[0] parts[1] bind[1] …`; `K` names it for the statement cache
/// (one marker type per distinct SQL text).
#[derive(Debug)]
pub(crate) struct Statement<'a, K> {
    parts: &'static [&'static str],
    binds: Vec<Bind<'a>>,
    marker: PhantomData<K>,
}

impl<'a, K> Statement<'a, K> {
    /// A statement of `parts` with `binds` between them (`parts.len() == binds.len() + 1`).
    pub(crate) fn new(parts: &'static [&'static str], binds: Vec<Bind<'a>>) -> Self {
        debug_assert_eq!(parts.len(), binds.len() + 1);
        Self {
            parts,
            binds,
            marker: PhantomData,
        }
    }
}

impl<K: 'static> QueryId for Statement<'_, K> {
    type QueryId = K;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<K> Query for Statement<'_, K> {
    type SqlType = Untyped;
}

/// `walk_ast` for one backend: the SQL pieces with the scalar binds between them (the same on
/// every backend); `$arrays` handles an array bind (`$bind`).
macro_rules! walk_statement {
    ($self:ident, $out:ident, |$bind:ident| $arrays:expr) => {{
        for (i, part) in $self.parts.iter().enumerate() {
            $out.push_sql(part);
            match $self.binds.get(i) {
                None => {}
                Some(Bind::BigInt(v)) => $out.push_bind_param::<BigInt, _>(v)?,
                Some(Bind::OptBigInt(v)) => $out.push_bind_param::<Nullable<BigInt>, _>(v)?,
                Some(Bind::Int(v)) => $out.push_bind_param::<Integer, _>(v)?,
                Some(Bind::Double(v)) => $out.push_bind_param::<Double, _>(v)?,
                Some(Bind::Bool(v)) => $out.push_bind_param::<Bool, _>(v)?,
                Some(Bind::Text(v)) => $out.push_bind_param::<Text, _>(*v)?,
                Some(Bind::OptText(v)) => $out.push_bind_param::<Nullable<Text>, _>(v)?,
                Some(Bind::Uuid(v)) => $out.push_bind_param::<Text, _>(v)?,
                Some(Bind::OptUuid(v)) => $out.push_bind_param::<Nullable<Text>, _>(v)?,
                Some(Bind::Timestamp(v)) => $out.push_bind_param::<Timestamp, _>(v)?,
                Some(Bind::OptTimestamp(v)) => $out.push_bind_param::<Nullable<Timestamp>, _>(v)?,
                Some($bind) => $arrays,
            }
        }
        Ok(())
    }};
}

impl<K> QueryFragment<Pg> for Statement<'_, K> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk_statement!(self, out, |bind| match bind {
            Bind::Texts(v) => out.push_bind_param::<Array<Text>, _>(v)?,
            Bind::OptTexts(v) => out.push_bind_param::<Array<Nullable<Text>>, _>(v)?,
            Bind::Uuids(v) => out.push_bind_param::<Array<Text>, _>(v)?,
            Bind::OptUuids(v) => out.push_bind_param::<Array<Nullable<Text>>, _>(v)?,
            Bind::Floats(v) => out.push_bind_param::<Array<Double>, _>(v)?,
            Bind::Timestamps(v) => out.push_bind_param::<Array<Timestamp>, _>(v)?,
            Bind::OptTimestamps(v) => out.push_bind_param::<Array<Nullable<Timestamp>>, _>(v)?,
            Bind::Ints(v) => out.push_bind_param::<Array<Integer>, _>(v)?,
            Bind::OptInts(v) => out.push_bind_param::<Array<Nullable<Integer>>, _>(v)?,
            // Scalars were pushed by the macro.
            _ => {}
        })
    }
}

impl<K> QueryFragment<Sqlite> for Statement<'_, K> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        walk_statement!(self, out, |_bind| {
            return Err(Error::QueryBuilderError(
                "array binds are PostgreSQL-only".into(),
            ));
        })
    }
}
