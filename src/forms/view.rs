//! From a template's schema versions to its views in schema `dingsync_forms`: names, types and
//! the SQL (docs/schema.md "Form views" states the rules for DBAs). Pure: no I/O; `store::forms`
//! runs what this writes.
//!
//! Rules written once here:
//! - a column belongs to a control *id*: its name is chosen when the id first appears (the
//!   configured name, else `bizAlias`, else the label) and kept while the view exists, so a
//!   renamed control keeps its column and a removed one keeps it too (NULL for approvals that
//!   lack the control);
//! - a column's type comes from the control's component in the newest version that has it;
//! - every typed value goes through a `dingsync.form_*` function that answers NULL for what does
//!   not parse (migration V21), so no value DingTalk sends can make a query on a view fail; the
//!   text that did not parse is in `_parse_errors`.

use std::collections::{BTreeMap, HashSet};

use super::schema::Control;

/// The schema the views live in.
pub const SCHEMA: &str = "dingsync_forms";
/// PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes.
pub const MAX_IDENT: usize = 63;

/// One stored version of a template's form (`dingsync.process_forms`).
#[derive(Debug, Clone)]
pub struct Version {
    pub version: i32,
    pub name: String,
    pub fetched_at: String,
    pub controls: Vec<Control>,
}

/// What the configuration says about names (`[forms] names`, `[forms] columns`).
#[derive(Debug, Clone, Default)]
pub struct Naming {
    /// The view's name, when configured.
    pub view: Option<String>,
    /// Column names by control id (a table's columns too).
    pub columns: BTreeMap<String, String>,
}

/// SQL types a control's column can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlType {
    Text,
    Numeric,
    Date,
    Timestamptz,
    TextArray,
    Jsonb,
}

impl SqlType {
    pub fn sql(self) -> &'static str {
        match self {
            SqlType::Text => "text",
            SqlType::Numeric => "numeric",
            SqlType::Date => "date",
            SqlType::Timestamptz => "timestamptz",
            SqlType::TextArray => "text[]",
            SqlType::Jsonb => "jsonb",
        }
    }

    /// Whether an index on the column can serve range filters (`[forms] indexes`).
    pub fn indexable(self) -> bool {
        matches!(
            self,
            SqlType::Numeric | SqlType::Date | SqlType::Timestamptz | SqlType::Text
        )
    }
}

/// How a control's column is typed, by its component and format.
fn column_type(control: &Control) -> SqlType {
    match control.component.as_str() {
        "NumberField" | "MoneyField" | "StarRatingField" => SqlType::Numeric,
        "DDDateField" | "DDDateRangeField" => match control.format.as_deref() {
            Some(f) if f.contains("HH") => SqlType::Timestamptz,
            _ => SqlType::Date,
        },
        "DDMultiSelectField" | "InnerContactField" | "DepartmentField" | "RelateField" => {
            SqlType::TextArray
        }
        "DDPhotoField" | "DDAttachment" => SqlType::Jsonb,
        _ => SqlType::Text,
    }
}

/// Which part of a control's value a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Whole,
    RangeStart,
    RangeEnd,
}

/// One column a control contributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub sql_type: SqlType,
    pub control_id: String,
    pub part: Part,
    /// The control as the newest version that has it describes it.
    pub component: String,
    pub label: String,
    pub biz_alias: Option<String>,
    pub first_version: i32,
    pub last_version: i32,
}

/// The view of a table control's line items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildView {
    pub name: String,
    pub control_id: String,
    pub label: String,
    pub first_version: i32,
    pub last_version: i32,
    pub columns: Vec<Column>,
}

/// Everything needed to write a template's views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewPlan {
    pub corp_id: String,
    pub process_code: String,
    pub template_name: String,
    pub name: String,
    pub version: i32,
    pub fetched_at: String,
    pub columns: Vec<Column>,
    pub children: Vec<ChildView>,
}

/// The approval's own columns every form view starts with, and what they mean.
pub const IDENTITY: [(&str, &str); 12] = [
    ("corp_id", "DingTalk organisation (CorpId)."),
    (
        "process_instance_id",
        "DingTalk approval instance id; join dingsync.approvals on (corp_id, process_instance_id).",
    ),
    ("business_id", "DingTalk approval serial number (审批编号)."),
    ("title", "Title DingTalk shows."),
    (
        "originator_userid",
        "userid of the person who started the approval.",
    ),
    (
        "originator_dept_id",
        "Department the approval was started in (-1 = root).",
    ),
    (
        "status",
        "NEW, RUNNING, COMPLETED, TERMINATED or CANCELED (dingsync.approvals.status).",
    ),
    (
        "result",
        "agree or refuse once COMPLETED; approved = COMPLETED and agree.",
    ),
    ("created_at", "When the approval was started in DingTalk."),
    ("finished_at", "When the approval finished."),
    (
        "_raw",
        "The form values as DingTalk sent them (dingsync.approvals.form_values); null until the detail fetch.",
    ),
    (
        "_parse_errors",
        "Values that did not parse into their typed column: {column: DingTalk's text}; null when every value parsed.",
    ),
];

/// The line-item view's own columns.
pub const CHILD_IDENTITY: [(&str, &str); 5] = [
    ("corp_id", "DingTalk organisation (CorpId)."),
    (
        "process_instance_id",
        "The approval the line item belongs to (the form view's process_instance_id).",
    ),
    (
        "row_number",
        "Position of the line item in the table, from 1.",
    ),
    ("_raw", "The line item as DingTalk sent it."),
    (
        "_parse_errors",
        "Cells that did not parse into their typed column: {column: DingTalk's text}; null when every cell parsed.",
    ),
];

/// The readable identifier for `text`: lower case, anything but letters, digits and `_` as `_`
/// (letters of any script stay: PostgreSQL takes them unquoted), a leading digit prefixed with
/// `c_`, at most `max` bytes. Empty when nothing readable is left.
pub fn identifier(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut underscore = false;
    for ch in text.trim().chars().flat_map(char::to_lowercase) {
        if ch.is_alphanumeric() {
            out.push(ch);
            underscore = false;
        } else if !underscore && !out.is_empty() {
            out.push('_');
            underscore = true;
        }
    }
    let mut out = out.trim_end_matches('_').to_string();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "c_");
    }
    truncate(&mut out, max);
    out.trim_end_matches('_').to_string()
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// `base`, or `base_2`, `base_3`… (shortened to fit) when taken; marks the result taken.
fn unique(base: &str, taken: &mut HashSet<String>) -> String {
    let base = if base.is_empty() { "control" } else { base };
    let mut n = 1;
    loop {
        let candidate = if n == 1 {
            let mut c = base.to_string();
            truncate(&mut c, MAX_IDENT);
            c
        } else {
            let suffix = format!("_{n}");
            let mut c = base.to_string();
            truncate(&mut c, MAX_IDENT - suffix.len());
            c + &suffix
        };
        if taken.insert(candidate.clone()) {
            return candidate;
        }
        n += 1;
    }
}

/// The two labels of a date range (its label is JSON text of both), when it has them.
fn range_labels(label: &str) -> Option<(String, String)> {
    let labels: Vec<String> = serde_json::from_str(label).ok()?;
    match labels.as_slice() {
        [a, b] => Some((a.clone(), b.clone())),
        _ => None,
    }
}

/// The name a control asks for before deduplication: configured, else bizAlias, else label.
fn wanted_name(control: &Control, naming: &Naming) -> String {
    if let Some(name) = naming.columns.get(&control.id) {
        return identifier(name, MAX_IDENT);
    }
    let from = control
        .biz_alias
        .as_deref()
        .filter(|a| !identifier(a, MAX_IDENT).is_empty())
        .unwrap_or(&control.label);
    let name = identifier(from, MAX_IDENT);
    if name.is_empty() {
        identifier(&control.id, MAX_IDENT)
    } else {
        name
    }
}

/// A table control met while assigning columns: as the newest version describes it, its first
/// and last version, and the name its line-item view is made from.
struct Table {
    control: Control,
    first: i32,
    last: i32,
    name: String,
}

/// Columns for a list of controls over all versions, in order of first appearance. `versions`
/// yields each version's controls (the top-level ones, or one table's children).
fn assign(
    versions: &[(i32, Vec<Control>)],
    naming: &Naming,
    reserved: &[&str],
) -> (Vec<Column>, Vec<Table>) {
    // The control as it first appeared (its name is chosen from that and kept), as the newest
    // version describes it (type, label), and its first and last version, in order of first
    // appearance.
    let mut order: Vec<String> = Vec::new();
    let mut first_seen: BTreeMap<String, Control> = BTreeMap::new();
    let mut seen: BTreeMap<String, (Control, i32, i32)> = BTreeMap::new();
    for (version, controls) in versions {
        for control in controls {
            match seen.get_mut(&control.id) {
                Some(entry) => {
                    entry.0 = control.clone();
                    entry.2 = *version;
                }
                None => {
                    order.push(control.id.clone());
                    first_seen.insert(control.id.clone(), control.clone());
                    seen.insert(control.id.clone(), (control.clone(), *version, *version));
                }
            }
        }
    }
    let mut taken: HashSet<String> = reserved.iter().map(|s| s.to_string()).collect();
    // Configured names first, so that a control appearing earlier cannot take one.
    let mut configured: BTreeMap<&str, String> = BTreeMap::new();
    for id in &order {
        if let Some(name) = naming.columns.get(id) {
            let name = identifier(name, MAX_IDENT);
            if !name.is_empty() && !reserved.contains(&name.as_str()) && taken.insert(name.clone())
            {
                configured.insert(id, name);
            }
        }
    }
    let mut columns = Vec::new();
    let mut tables = Vec::new();
    for id in &order {
        let (control, first, last) = &seen[id];
        if control.component == "TableField" {
            let name = configured
                .get(id.as_str())
                .cloned()
                .unwrap_or_else(|| wanted_name(&first_seen[id], naming));
            tables.push(Table {
                control: control.clone(),
                first: *first,
                last: *last,
                name,
            });
            continue;
        }
        let sql_type = column_type(control);
        let column = |name: String, part: Part| Column {
            name,
            sql_type,
            control_id: id.clone(),
            part,
            component: control.component.clone(),
            label: control.label.clone(),
            biz_alias: control.biz_alias.clone(),
            first_version: *first,
            last_version: *last,
        };
        let first_control = &first_seen[id];
        let base = configured
            .get(id.as_str())
            .cloned()
            .unwrap_or_else(|| wanted_name(first_control, naming));
        if control.component == "DDDateRangeField" {
            // Two columns: from the two labels, unless a name was configured or a bizAlias set.
            let named = configured.contains_key(id.as_str()) || first_control.biz_alias.is_some();
            let (start, end) = match range_labels(&first_control.label) {
                Some((a, b)) if !named => {
                    let (a, b) = (identifier(&a, MAX_IDENT), identifier(&b, MAX_IDENT));
                    if a.is_empty() || b.is_empty() || a == b {
                        (format!("{base}_start"), format!("{base}_end"))
                    } else {
                        (a, b)
                    }
                }
                _ => (format!("{base}_start"), format!("{base}_end")),
            };
            let start = unique(&identifier(&start, MAX_IDENT), &mut taken);
            let end = unique(&identifier(&end, MAX_IDENT), &mut taken);
            columns.push(column(start, Part::RangeStart));
            columns.push(column(end, Part::RangeEnd));
        } else {
            let name = match configured.get(id.as_str()) {
                Some(name) => name.clone(),
                None => unique(&base, &mut taken),
            };
            columns.push(column(name, Part::Whole));
        }
    }
    (columns, tables)
}

/// The plan of `process_code`'s views from all its stored versions (oldest first).
pub fn plan(corp_id: &str, process_code: &str, versions: &[Version], naming: &Naming) -> ViewPlan {
    let newest = versions
        .last()
        .expect("a template with a view has a version");
    let reserved: Vec<&str> = IDENTITY.iter().map(|(n, _)| *n).collect();
    let top: Vec<(i32, Vec<Control>)> = versions
        .iter()
        .map(|v| (v.version, v.controls.clone()))
        .collect();
    let (columns, tables) = assign(&top, naming, &reserved);
    let name = view_name(process_code, &versions[0].name, naming);
    let child_reserved: Vec<&str> = CHILD_IDENTITY.iter().map(|(n, _)| *n).collect();
    let mut child_names: HashSet<String> = HashSet::new();
    let mut taken_columns: HashSet<String> = columns.iter().map(|c| c.name.clone()).collect();
    taken_columns.extend(reserved.iter().map(|s| s.to_string()));
    let children = tables
        .into_iter()
        .map(
            |Table {
                 control: table,
                 first,
                 last,
                 name: table_name,
             }| {
                // The children of this table in every version that has it.
                let rows: Vec<(i32, Vec<Control>)> = versions
                    .iter()
                    .filter_map(|v| {
                        v.controls
                            .iter()
                            .find(|c| c.id == table.id)
                            .map(|c| (v.version, c.children.clone()))
                    })
                    .collect();
                let (cells, _) = assign(&rows, naming, &child_reserved);
                let base = unique(&table_name, &mut taken_columns);
                let child = unique(
                    &identifier(&format!("{name}_{base}"), MAX_IDENT),
                    &mut child_names,
                );
                ChildView {
                    name: child,
                    control_id: table.id.clone(),
                    label: table.label.clone(),
                    first_version: first,
                    last_version: last,
                    columns: cells,
                }
            },
        )
        .collect();
    ViewPlan {
        corp_id: corp_id.to_string(),
        process_code: process_code.to_string(),
        template_name: newest.name.clone(),
        name,
        version: newest.version,
        fetched_at: newest.fetched_at.clone(),
        columns,
        children,
    }
}

/// The view's name: configured, else from the template's first name, else from the code.
fn view_name(process_code: &str, first_name: &str, naming: &Naming) -> String {
    for candidate in [naming.view.as_deref(), Some(first_name), Some(process_code)]
        .into_iter()
        .flatten()
    {
        // Room for a child view's suffix.
        let name = identifier(candidate, 40);
        if !name.is_empty() {
            return name;
        }
    }
    "form".into()
}

/// Deduplicates view names across templates: configured names first, then by process code;
/// the first keeps its name.
pub fn dedupe_views(plans: &mut [ViewPlan], configured: &HashSet<String>) {
    plans.sort_by(|a, b| {
        let key = |p: &ViewPlan| {
            (
                !configured.contains(&p.process_code),
                p.corp_id.clone(),
                p.process_code.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    let mut taken = HashSet::new();
    for plan in plans.iter_mut() {
        let name = unique(&plan.name, &mut taken);
        if name != plan.name {
            let old = std::mem::replace(&mut plan.name, name.clone());
            for child in &mut plan.children {
                if let Some(rest) = child.name.strip_prefix(&old) {
                    child.name = identifier(&format!("{name}{rest}"), MAX_IDENT);
                }
            }
        }
        for child in &plan.children {
            taken.insert(child.name.clone());
        }
    }
}

/// `"name"`, quoted for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, quoted for SQL.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The SQL of a column's value, over `form_values` (an expression) for a top-level control.
fn typed(column: &Column, raw: &str, ext: &str) -> String {
    let raw = match column.part {
        Part::Whole => raw.to_string(),
        Part::RangeStart => format!("dingsync.form_range_part({raw}, 1)"),
        Part::RangeEnd => format!("dingsync.form_range_part({raw}, 2)"),
    };
    match (column.sql_type, column.component.as_str()) {
        (SqlType::Numeric, _) => format!("dingsync.form_numeric({raw})"),
        (SqlType::Date, _) => format!("dingsync.form_date({raw})"),
        (SqlType::Timestamptz, _) => format!("dingsync.form_timestamptz({raw})"),
        (SqlType::TextArray, "InnerContactField") => {
            format!("dingsync.form_userids({ext}, {raw})")
        }
        (SqlType::TextArray, "DepartmentField") => format!("dingsync.form_list({raw})"),
        (SqlType::TextArray, _) => format!("dingsync.form_text_array({raw})"),
        (SqlType::Jsonb, _) => format!("dingsync.form_jsonb({raw})"),
        (SqlType::Text, "TextareaField") => format!("dingsync.form_textarea({raw})"),
        (SqlType::Text, _) => format!("dingsync.form_text({raw})"),
    }
}

/// Every column's typed value and the raw text it comes from.
fn column_sql(
    columns: &[Column],
    raw_of: impl Fn(&Column) -> (String, String),
) -> Vec<(String, String)> {
    columns
        .iter()
        .map(|c| {
            let (raw, ext) = raw_of(c);
            (typed(c, &raw, &ext), raw)
        })
        .collect()
}

/// `_parse_errors`: the raw text of each typed column whose value is there but did not parse.
fn parse_errors(columns: &[Column], sql: &[(String, String)]) -> String {
    let pairs: Vec<String> = columns
        .iter()
        .zip(sql)
        .filter(|(c, _)| c.sql_type != SqlType::Text)
        .map(|(c, (value, raw))| {
            format!(
                "{}, CASE WHEN dingsync.form_text({raw}) IS NOT NULL AND {value} IS NULL THEN {raw} END",
                quote_literal(&c.name)
            )
        })
        .collect();
    if pairs.is_empty() {
        return "NULL::jsonb".into();
    }
    // jsonb_build_object takes at most 100 arguments: 50 pairs a call.
    let parts: Vec<String> = pairs
        .chunks(50)
        .map(|chunk| format!("jsonb_build_object({})", chunk.join(", ")))
        .collect();
    format!(
        "NULLIF(jsonb_strip_nulls({}), '{{}}'::jsonb)",
        parts.join(" || ")
    )
}

fn raw_of(form_values: &str) -> impl Fn(&Column) -> (String, String) + '_ {
    move |c: &Column| {
        let id = quote_literal(&c.control_id);
        (
            format!("dingsync.form_value({form_values}, {id})"),
            format!("dingsync.form_ext({form_values}, {id})"),
        )
    }
}

/// An expression index on `dingsync.approvals` serving `column` of the form view `plan`: its
/// name and definition (`(expression) WHERE ...`). The expression is the view's own, so the
/// planner matches a filter on the view's column with it.
pub fn index_definition(plan: &ViewPlan, column: &str) -> Option<(String, String)> {
    let c = plan.columns.iter().find(|c| c.name == column)?;
    if !c.sql_type.indexable() {
        return None;
    }
    let (raw, ext) = raw_of("form_values")(c);
    let expr = typed(c, &raw, &ext);
    let definition = format!(
        "(({expr})) WHERE corp_id = {} AND process_code = {}",
        quote_literal(&plan.corp_id),
        quote_literal(&plan.process_code)
    );
    use sha2::Digest;
    let digest = sha2::Sha256::digest(definition.as_bytes());
    let mut base = identifier(&format!("form_{}_{}", plan.name, c.name), 50);
    truncate(&mut base, 50);
    Some((format!("{base}_{}", &hex::encode(digest)[..8]), definition))
}

/// The form view's SELECT.
pub fn select(plan: &ViewPlan) -> String {
    let raw_of = raw_of("a.form_values");
    let sql = column_sql(&plan.columns, raw_of);
    let mut select = vec![
        "a.corp_id".to_string(),
        "a.process_instance_id".into(),
        "a.business_id".into(),
        "a.title".into(),
        "a.originator_userid".into(),
        "a.originator_dept_id".into(),
        "a.status".into(),
        "a.result".into(),
        "a.created_at".into(),
        "a.finished_at".into(),
        "a.form_values AS _raw".into(),
        format!("{} AS _parse_errors", parse_errors(&plan.columns, &sql)),
    ];
    for (column, (value, _)) in plan.columns.iter().zip(&sql) {
        select.push(format!("{value} AS {}", quote_ident(&column.name)));
    }
    format!(
        "SELECT {}\nFROM dingsync.approvals a\nWHERE a.corp_id = {} AND a.process_code = {}",
        select.join(",\n       "),
        quote_literal(&plan.corp_id),
        quote_literal(&plan.process_code)
    )
}

/// A line-item view's SELECT.
pub fn child_select(plan: &ViewPlan, child: &ChildView) -> String {
    let raw_of = |c: &Column| {
        (
            format!(
                "dingsync.form_cell(r.item, {}, {})",
                quote_literal(&c.control_id),
                quote_literal(&c.label)
            ),
            "NULL::text".to_string(),
        )
    };
    let sql = column_sql(&child.columns, raw_of);
    let mut select = vec![
        "a.corp_id".to_string(),
        "a.process_instance_id".into(),
        "r.n::int AS row_number".into(),
        "r.item AS _raw".into(),
        format!("{} AS _parse_errors", parse_errors(&child.columns, &sql)),
    ];
    for (column, (value, _)) in child.columns.iter().zip(&sql) {
        select.push(format!("{value} AS {}", quote_ident(&column.name)));
    }
    format!(
        "SELECT {}\nFROM dingsync.approvals a\nCROSS JOIN LATERAL jsonb_array_elements(dingsync.form_rows(dingsync.form_value(a.form_values, {}))) WITH ORDINALITY AS r(item, n)\nWHERE a.corp_id = {} AND a.process_code = {}",
        select.join(",\n       "),
        quote_literal(&child.control_id),
        quote_literal(&plan.corp_id),
        quote_literal(&plan.process_code)
    )
}

fn versions_text(first: i32, last: i32, newest: i32) -> String {
    let span = if first == last {
        format!("schema version {first}")
    } else {
        format!("schema versions {first}-{last}")
    };
    if last < newest {
        format!("{span}; not in version {newest} (null for approvals without it)")
    } else {
        span
    }
}

/// The comment on a control's column.
pub fn column_comment(column: &Column, newest: i32) -> String {
    let part = match column.part {
        Part::Whole => "",
        Part::RangeStart => " (start of the range)",
        Part::RangeEnd => " (end of the range)",
    };
    let alias = column
        .biz_alias
        .as_deref()
        .map(|a| format!(", bizAlias {a}"))
        .unwrap_or_default();
    format!(
        "Control {} \"{}\"{part} ({}{alias} as {}), {}. Null where the value is absent or does not parse (then in _parse_errors).",
        column.control_id,
        column.label,
        column.component,
        column.sql_type.sql(),
        versions_text(column.first_version, column.last_version, newest)
    )
}

/// The comment on the form view.
pub fn view_comment(plan: &ViewPlan) -> String {
    format!(
        "Form of template {} \"{}\" ({} of organisation {}, schema version {} fetched {}): one row per approval, a typed column per control. Generated by dingsync from dingsync.process_forms; replaced when the schema changes (columns are kept).",
        plan.process_code,
        plan.template_name,
        "dingsync.approvals",
        plan.corp_id,
        plan.version,
        plan.fetched_at
    )
}

/// The comment on a line-item view.
pub fn child_comment(plan: &ViewPlan, child: &ChildView) -> String {
    format!(
        "Line items of table control {} \"{}\" of template {} ({}): one row per line item, keyed by (corp_id, process_instance_id, row_number). Generated by dingsync, schema version {}.",
        child.control_id,
        child.label,
        plan.process_code,
        versions_text(child.first_version, child.last_version, plan.version),
        plan.version
    )
}

/// One view to write: its name, its SELECT and its COMMENT statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewSql {
    pub name: String,
    pub select: String,
    pub comments: Vec<String>,
}

/// The views of `plan`: the form view, then one per table control.
pub fn views(plan: &ViewPlan) -> Vec<ViewSql> {
    let qualified = |view: &str| format!("{SCHEMA}.{}", quote_ident(view));
    let comment_column = |view: &str, column: &str, text: &str| {
        format!(
            "COMMENT ON COLUMN {}.{} IS {}",
            qualified(view),
            quote_ident(column),
            quote_literal(text)
        )
    };
    let mut comments = vec![format!(
        "COMMENT ON VIEW {} IS {}",
        qualified(&plan.name),
        quote_literal(&view_comment(plan))
    )];
    for (column, text) in IDENTITY {
        comments.push(comment_column(&plan.name, column, text));
    }
    for column in &plan.columns {
        comments.push(comment_column(
            &plan.name,
            &column.name,
            &column_comment(column, plan.version),
        ));
    }
    let mut out = vec![ViewSql {
        name: plan.name.clone(),
        select: select(plan),
        comments,
    }];
    for child in &plan.children {
        let mut comments = vec![format!(
            "COMMENT ON VIEW {} IS {}",
            qualified(&child.name),
            quote_literal(&child_comment(plan, child))
        )];
        for (column, text) in CHILD_IDENTITY {
            comments.push(comment_column(&child.name, column, text));
        }
        for column in &child.columns {
            comments.push(comment_column(
                &child.name,
                &column.name,
                &column_comment(column, plan.version),
            ));
        }
        out.push(ViewSql {
            name: child.name.clone(),
            select: child_select(plan, child),
            comments,
        });
    }
    out
}

/// A fingerprint of the views' SQL: the same text, nothing to regenerate.
pub fn views_hash(views: &[ViewSql]) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for view in views {
        for part in std::iter::once(&view.name)
            .chain(std::iter::once(&view.select))
            .chain(&view.comments)
        {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(id: &str, component: &str, label: &str) -> Control {
        Control {
            id: id.into(),
            component: component.into(),
            label: label.into(),
            biz_alias: None,
            required: false,
            options: vec![],
            format: None,
            children: vec![],
        }
    }

    fn version(version: i32, controls: Vec<Control>) -> Version {
        Version {
            version,
            name: "报销".into(),
            fetched_at: "2026-12-08".into(),
            controls,
        }
    }

    #[test]
    fn identifiers_are_readable_unicode_and_fit_63_bytes() {
        assert_eq!(identifier("Amount (CNY)", 63), "amount_cny");
        assert_eq!(identifier("报销金额", 63), "报销金额");
        assert_eq!(identifier("2nd approver", 63), "c_2nd_approver");
        assert_eq!(identifier("  --  ", 63), "");
        let long = identifier(&"金".repeat(40), 63);
        assert!(
            long.len() <= 63 && long.chars().all(|c| c == '金'),
            "{long}"
        );
    }

    #[test]
    fn columns_come_from_biz_alias_then_label_deduplicated_and_typed() {
        let mut amount = control("MoneyField-1", "MoneyField", "Amount");
        amount.biz_alias = Some("amount".into());
        let mut when = control("DDDateField-2", "DDDateField", "Date");
        when.format = Some("yyyy-MM-dd HH:mm".into());
        let v = version(
            1,
            vec![
                control("TextField-1", "TextField", "Reason"),
                control("TextField-2", "TextField", "reason"),
                amount,
                when,
                control(
                    "DDDateRangeField-3",
                    "DDDateRangeField",
                    r#"["开始时间","结束时间"]"#,
                ),
                control("DDMultiSelectField-4", "DDMultiSelectField", "Tags"),
                control("DDAttachment-5", "DDAttachment", "Files"),
                control("X-6", "SomethingNew", "Status"),
            ],
        );
        let plan = plan("corp", "PROC-1", &[v], &Naming::default());
        let got: Vec<(&str, &str)> = plan
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.sql_type.sql()))
            .collect();
        assert_eq!(
            got,
            [
                ("reason", "text"),
                ("reason_2", "text"),
                ("amount", "numeric"),
                ("date", "timestamptz"),
                ("开始时间", "date"),
                ("结束时间", "date"),
                ("tags", "text[]"),
                ("files", "jsonb"),
                ("status_2", "text"),
            ]
        );
        assert_eq!(plan.name, "报销");
    }

    #[test]
    fn a_renamed_control_keeps_its_column_and_a_removed_one_stays() {
        let v1 = version(
            1,
            vec![
                control("TextField-1", "TextField", "Reason"),
                control("TextField-2", "TextField", "Note"),
            ],
        );
        let v2 = version(
            2,
            vec![
                control("TextField-1", "TextField", "Purpose"),
                control("NumberField-3", "NumberField", "Reason"),
            ],
        );
        let plan = plan("corp", "PROC-1", &[v1, v2], &Naming::default());
        let got: Vec<(&str, &str, i32, i32)> = plan
            .columns
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    c.label.as_str(),
                    c.first_version,
                    c.last_version,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("reason", "Purpose", 1, 2),
                ("note", "Note", 1, 1),
                ("reason_2", "Reason", 2, 2),
            ]
        );
        assert!(column_comment(&plan.columns[1], 2).contains("not in version 2"));
    }

    #[test]
    fn configured_names_win_and_tables_get_a_child_view() {
        let mut table = control("TableField-9", "TableField", "明细");
        table.children = vec![
            control("TextField-c1", "TextField", "品名"),
            control("MoneyField-c2", "MoneyField", "金额"),
        ];
        let v = version(
            1,
            vec![
                control("TextField-1", "TextField", "Reason"),
                control("TextField-2", "TextField", "Why"),
                table,
            ],
        );
        let naming = Naming {
            view: Some("expense".into()),
            columns: [("TextField-2".to_string(), "reason".to_string())].into(),
        };
        let plan = plan("corp", "PROC-1", &[v], &naming);
        assert_eq!(plan.name, "expense");
        assert_eq!(plan.columns[0].name, "reason_2");
        assert_eq!(plan.columns[1].name, "reason");
        assert_eq!(plan.children.len(), 1);
        assert_eq!(plan.children[0].name, "expense_明细");
        assert_eq!(plan.children[0].columns[1].sql_type, SqlType::Numeric);
        let sql = child_select(&plan, &plan.children[0]);
        assert!(sql.contains("WITH ORDINALITY"), "{sql}");
    }

    #[test]
    fn view_names_are_deduplicated_across_templates() {
        let v = version(1, vec![control("TextField-1", "TextField", "Reason")]);
        let mut plans = vec![
            plan(
                "corp",
                "PROC-B",
                std::slice::from_ref(&v),
                &Naming::default(),
            ),
            plan("corp", "PROC-A", &[v], &Naming::default()),
        ];
        dedupe_views(&mut plans, &HashSet::new());
        assert_eq!(plans[0].process_code, "PROC-A");
        assert_eq!(plans[0].name, "报销");
        assert_eq!(plans[1].name, "报销_2");
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
