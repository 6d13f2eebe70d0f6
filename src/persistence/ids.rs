//! How the domain's id newtypes ([`crate::domain::ids`]) are stored: each is a `TEXT` column on
//! both backends, so a row struct, an insert form or a query takes `DeviceId`, `IncidentId`, …
//! directly instead of a `String` converted by hand at every call.
//!
//! # Why the mapping lives here and not on the types
//!
//! `domain/` depends on nothing outside itself, diesel included (`docs/architecture.md`,
//! "Layers"). `#[derive(AsExpression, FromSqlRow)]` on the newtypes would be declarative, but
//! it would still make the domain name diesel's SQL types and compile against diesel; a
//! `#[cfg_attr(feature = …)]` would only move that dependency behind a feature every build
//! turns on. The orphan rule allows `impl ToSql<Text, Pg> for DeviceId` in any module of the
//! crate that defines `DeviceId`, so this module implements by hand, once per id (a macro),
//! what those derives generate: [`ToSql`] and [`FromSql`] for `Text` on SQLite and
//! PostgreSQL, [`Queryable`] (a field of a `Queryable`/`Selectable` row, or a column loaded on
//! its own) and [`AsExpression`] for `Text` and `Nullable<Text>`, by value and by reference
//! (`.eq(id)`, `.eq_any(&ids)`, `.find(id)`, a field of an `Insertable` row). It must not hold
//! rules: only the encoding.
//!
//! # The encoding (unchanged, so no migration)
//!
//! - A string id (`DeviceId`, `PatientId`, `UnitId`, `HospitalId`) is stored as itself.
//! - A UUID id (`IncidentId`, `OfferId`, `TokenId`) is stored as its hyphenated lower-case
//!   text, which is what its `Display` wrote when rows were built from `to_string()`. Reading
//!   accepts whatever [`uuid::Uuid::parse_str`] accepts, as the `parse()` calls did; a value
//!   that is not a UUID fails to decode, which [`super::StoreError`] reports as
//!   `Corrupt`, as before.

use std::io::Write as _;

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql, Queryable};
use diesel::expression::AsExpression;
use diesel::pg::Pg;
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{Nullable, SingleValue, Text};
use diesel::sqlite::Sqlite;
use uuid::Uuid;

use crate::domain::ids::{DeviceId, HospitalId, IncidentId, OfferId, PatientId, TokenId, UnitId};

/// A UUID bound as `TEXT` in its stored form (hyphenated, lower case), without building a
/// `String` on PostgreSQL: what a UUID id becomes in a query, and what the hand-written
/// statements bind (`statement::Bind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, AsExpression)]
#[diesel(sql_type = Text)]
pub struct UuidText(pub Uuid);

impl ToSql<Text, Pg> for UuidText {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        uuid_to_pg(&self.0, out)
    }
}

impl ToSql<Text, Sqlite> for UuidText {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        uuid_to_sqlite(&self.0, out)
    }
}

/// Writes `id` as PostgreSQL `TEXT` (its bytes), formatted on the stack.
fn uuid_to_pg(id: &Uuid, out: &mut Output<'_, '_, Pg>) -> serialize::Result {
    let mut buffer = Uuid::encode_buffer();
    out.write_all(id.hyphenated().encode_lower(&mut buffer).as_bytes())?;
    Ok(IsNull::No)
}

/// Binds `id` as SQLite `TEXT` (SQLite copies an owned string into the statement).
fn uuid_to_sqlite(id: &Uuid, out: &mut Output<'_, '_, Sqlite>) -> serialize::Result {
    out.set_value(id.hyphenated().to_string());
    Ok(IsNull::No)
}

/// What every id gets whatever it wraps: loading (a lone column or a row field) and the
/// `Nullable<Text>` form of its [`ToSql`].
macro_rules! id_common {
    ($name:ident) => {
        impl<DB, ST> Queryable<ST, DB> for $name
        where
            DB: Backend,
            ST: SingleValue,
            Self: FromSql<ST, DB>,
        {
            type Row = Self;

            fn build(row: Self) -> deserialize::Result<Self> {
                Ok(row)
            }
        }

        impl<DB> ToSql<Nullable<Text>, DB> for $name
        where
            DB: Backend,
            Self: ToSql<Text, DB>,
        {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
                ToSql::<Text, DB>::to_sql(self, out)
            }
        }
    };
}

/// A string id: stored as its text; as an expression it is that `&str` (or `String`).
macro_rules! string_id_sql {
    ($($name:ident),* $(,)?) => {$(
        id_common!($name);

        impl<DB> ToSql<Text, DB> for $name
        where
            DB: Backend,
            str: ToSql<Text, DB>,
        {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
                ToSql::<Text, DB>::to_sql(self.0.as_str(), out)
            }
        }

        impl<DB> FromSql<Text, DB> for $name
        where
            DB: Backend,
            String: FromSql<Text, DB>,
        {
            fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
                String::from_sql(bytes).map(Self)
            }
        }

        string_id_sql!(@expr $name, Text);
        string_id_sql!(@expr $name, Nullable<Text>);
    )*};
    (@expr $name:ident, $st:ty) => {
        impl AsExpression<$st> for $name {
            type Expression = <String as AsExpression<$st>>::Expression;
            fn as_expression(self) -> Self::Expression {
                AsExpression::<$st>::as_expression(self.0)
            }
        }

        impl<'a> AsExpression<$st> for &'a $name {
            type Expression = <&'a str as AsExpression<$st>>::Expression;
            fn as_expression(self) -> Self::Expression {
                AsExpression::<$st>::as_expression(self.0.as_str())
            }
        }

        impl<'a> AsExpression<$st> for &&'a $name {
            type Expression = <&'a str as AsExpression<$st>>::Expression;
            fn as_expression(self) -> Self::Expression {
                AsExpression::<$st>::as_expression((*self).0.as_str())
            }
        }
    };
}

/// A UUID id: stored as its hyphenated lower-case text; as an expression it is a [`UuidText`].
macro_rules! uuid_id_sql {
    ($($name:ident: $what:literal),* $(,)?) => {$(
        id_common!($name);

        impl ToSql<Text, Pg> for $name {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                uuid_to_pg(&self.0, out)
            }
        }

        impl ToSql<Text, Sqlite> for $name {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
                uuid_to_sqlite(&self.0, out)
            }
        }

        impl<DB> FromSql<Text, DB> for $name
        where
            DB: Backend,
            String: FromSql<Text, DB>,
        {
            fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
                let text = String::from_sql(bytes)?;
                Uuid::parse_str(&text)
                    .map(Self)
                    .map_err(|e| format!(concat!($what, " {:?}: {}"), text, e).into())
            }
        }

        impl From<$name> for UuidText {
            fn from(id: $name) -> Self {
                Self(id.0)
            }
        }

        uuid_id_sql!(@expr $name, Text);
        uuid_id_sql!(@expr $name, Nullable<Text>);
    )*};
    (@expr $name:ident, $st:ty) => {
        impl AsExpression<$st> for $name {
            type Expression = <UuidText as AsExpression<$st>>::Expression;
            fn as_expression(self) -> Self::Expression {
                AsExpression::<$st>::as_expression(UuidText(self.0))
            }
        }

        impl AsExpression<$st> for &$name {
            type Expression = <UuidText as AsExpression<$st>>::Expression;
            fn as_expression(self) -> Self::Expression {
                AsExpression::<$st>::as_expression(UuidText(self.0))
            }
        }

        impl AsExpression<$st> for &&$name {
            type Expression = <UuidText as AsExpression<$st>>::Expression;
            fn as_expression(self) -> Self::Expression {
                AsExpression::<$st>::as_expression(UuidText(self.0))
            }
        }
    };
}

string_id_sql!(DeviceId, PatientId, UnitId, HospitalId);
uuid_id_sql!(IncidentId: "incident id", OfferId: "offer id", TokenId: "token id");
