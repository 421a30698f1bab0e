//! Forms as tables: what a template's form schema is (`schema`) and how its typed views in schema
//! `dingsync_forms` are named, typed and written (`view`). Pure: no I/O, no clock. Fetching the
//! schemas and deciding when is the `forms` job's (`reconcile::forms`); running the SQL is
//! `store::forms`'s; the rules DBAs rely on are in docs/schema.md "Form views".

pub mod schema;
pub mod view;

pub use schema::{Control, FormSchema};
pub use view::{Naming, Version, ViewPlan};
