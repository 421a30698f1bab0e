//! An outbox row as the `processinstance/create` request DingTalk takes (docs/dingtalk.md §2.1, §2.2), and
//! the test of whether an instance found later is the one a row asked for.
//!
//! The outbox stores form values as JSON for the app's convenience (numbers, arrays, tables);
//! DingTalk wants every `value` as a string, JSON text where the control holds a list. The
//! conversion here is the only place that knows the difference.

use serde_json::Value;

use crate::{
    dingtalk::types::{ApproverNode, CreateInstance, FormValue, ProcessInstance, SelectActioner},
    store::outbox::OutboxRow,
};

/// The create request for `row`. Fails (with the reason) only for a row the database's checks
/// should already have refused.
pub fn create_request(row: &OutboxRow) -> Result<CreateInstance, String> {
    Ok(CreateInstance {
        process_code: row.process_code.clone(),
        originator_user_id: row.originator_user_id.clone(),
        dept_id: row.dept_id,
        agent_id: None,
        approvers: None,
        approvers_v2: row.approvers.as_ref().map(approver_nodes).transpose()?,
        cc_list: row.cc_list.as_ref().map(|cc| cc.join(",")),
        cc_position: row.cc_position.clone(),
        form_component_values: form_values(&row.form_values)?,
        target_select_actioners: row
            .select_approvers
            .as_ref()
            .map(select_actioners)
            .transpose()?
            .unwrap_or_default(),
    })
}

/// `select_approvers` (`{"<actionerKey>": ["userid", ...]}`) as v1.0's `targetSelectActioners`
/// (docs/dingtalk.md §11.2), in key order.
fn select_actioners(chosen: &Value) -> Result<Vec<SelectActioner>, String> {
    let nodes = chosen
        .as_object()
        .ok_or("select_approvers is not a JSON object")?;
    nodes
        .iter()
        .map(|(key, users)| {
            let user_ids = users
                .as_array()
                .and_then(|u| {
                    u.iter()
                        .map(|u| u.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| format!("select_approvers.{key} is not an array of userids"))?;
            Ok(SelectActioner {
                actioner_key: key.clone(),
                user_ids,
            })
        })
        .collect()
}

/// `[{"name", "value", "ext_value"}]` with every name and value as DingTalk's string.
pub fn form_values(values: &Value) -> Result<Vec<FormValue>, String> {
    let items = values.as_array().ok_or("form_values is not a JSON array")?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let name = match item.get("name") {
                Some(Value::String(s)) => s.clone(),
                // A date range names both its labels: JSON text of the pair (docs/dingtalk.md §2.2).
                Some(v @ Value::Array(_)) => v.to_string(),
                _ => return Err(format!("form_values[{i}].name is not text")),
            };
            let value = item
                .get("value")
                .ok_or_else(|| format!("form_values[{i}].value is missing"))
                .and_then(|v| value_text(v).ok_or(format!("form_values[{i}].value: bad shape")))?;
            let ext_value = item
                .get("ext_value")
                .and_then(Value::as_str)
                .map(str::to_string);
            let details = item.get("value").map(table_rows).unwrap_or_default();
            Ok(FormValue {
                name,
                value,
                ext_value,
                details,
            })
        })
        .collect()
}

/// A value as DingTalk's string: text as is, a number as its digits, an array as compact JSON
/// text (with the cells of a table turned into strings: DingTalk's cells are strings too).
fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(items) => {
            Some(Value::Array(items.iter().map(stringify_cells).collect()).to_string())
        }
        _ => None,
    }
}

/// A table's rows (an array of rows, each an array of `{"name", "value"}` cells) as the cells
/// v1.0 sends in `details` (docs/dingtalk.md §11.2); empty for a value that is no table.
fn table_rows(value: &Value) -> Vec<Vec<FormValue>> {
    let Some(rows) = value.as_array() else {
        return Vec::new();
    };
    let cells = |row: &Value| -> Option<Vec<FormValue>> {
        row.as_array()?
            .iter()
            .map(|cell| {
                Some(FormValue {
                    name: cell.get("name")?.as_str()?.to_string(),
                    value: match cell.get("value")? {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => return None,
                    },
                    ..FormValue::default()
                })
            })
            .collect()
    };
    if rows.is_empty() || !rows.iter().all(Value::is_array) {
        return Vec::new();
    }
    rows.iter()
        .map(cells)
        .collect::<Option<_>>()
        .unwrap_or_default()
}

/// Inside a table row (an array of `{"name", "value"}`), numbers become strings.
fn stringify_cells(item: &Value) -> Value {
    match item {
        Value::Array(cells) => Value::Array(
            cells
                .iter()
                .map(|cell| match cell {
                    Value::Object(map) => Value::Object(
                        map.iter()
                            .map(|(k, v)| match v {
                                Value::Number(n) => (k.clone(), Value::String(n.to_string())),
                                other => (k.clone(), other.clone()),
                            })
                            .collect(),
                    ),
                    other => other.clone(),
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `approvers` (userids or `{"action", "user_ids"}` nodes) as `approvers_v2`.
fn approver_nodes(approvers: &Value) -> Result<Vec<ApproverNode>, String> {
    let nodes = approvers
        .as_array()
        .ok_or("approvers is not a JSON array")?;
    nodes
        .iter()
        .map(|node| match node {
            Value::String(userid) => Ok(ApproverNode {
                task_action_type: "NONE".into(),
                user_ids: vec![userid.clone()],
            }),
            Value::Object(map) => Ok(ApproverNode {
                task_action_type: map
                    .get("action")
                    .and_then(Value::as_str)
                    .ok_or("an approver node has no action")?
                    .to_string(),
                user_ids: map
                    .get("user_ids")
                    .and_then(Value::as_array)
                    .ok_or("an approver node has no user_ids")?
                    .iter()
                    .map(|u| u.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("approver user_ids must be text")?,
            }),
            _ => Err("an approver is neither a userid nor a node".to_string()),
        })
        .collect()
}

/// Controls whose value reads back from `processinstance/get` exactly as it was sent (docs/dingtalk.md
/// §2.3). Others are rewritten by DingTalk (people become names, tables gain row metadata,
/// attachments gain numeric sizes), so they cannot be compared.
const VERBATIM: &[&str] = &[
    "TextField",
    "TextareaField",
    "NumberField",
    "MoneyField",
    "DDSelectField",
    "DDMultiSelectField",
    "DDDateField",
    "DDDateRangeField",
    "DDPhotoField",
    "RelateField",
    "AddressField",
    "StarRatingField",
];

/// Whether `instance` (a `processinstance/get` snapshot) is what `sent` asked for: same
/// originator, and every sent value of a verbatim control read back unchanged. Numbers compare
/// as numbers ("100" = "100.00"). The caller has already filtered by template and create time.
pub fn matches(sent: &CreateInstance, instance: &ProcessInstance) -> bool {
    matches_read(
        sent,
        instance.originator_userid.as_deref(),
        &instance.form_component_values,
    )
}

/// [`matches`] against what a `processinstance/get` read back: its originator and its
/// `form_component_values` (as a snapshot stored in `dingsync.approvals` keeps them).
pub fn matches_read(
    sent: &CreateInstance,
    originator: Option<&str>,
    read_values: &[Value],
) -> bool {
    if originator != Some(sent.originator_user_id.as_str()) {
        return false;
    }
    sent.form_component_values.iter().all(|value| {
        let Some(read) = read_values
            .iter()
            .find(|r| r.get("name").and_then(Value::as_str) == Some(value.name.as_str()))
        else {
            // DingTalk reads back every control of the template by its label: a value it does not
            // list was not part of this instance.
            return false;
        };
        let kind = read
            .get("component_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        let read_value = read.get("value").and_then(Value::as_str).unwrap_or("");
        if !VERBATIM.contains(&kind) || value.value.trim().is_empty() {
            return true;
        }
        if matches!(kind, "NumberField" | "MoneyField" | "StarRatingField") {
            return match (
                value.value.trim().parse::<f64>(),
                read_value.trim().parse::<f64>(),
            ) {
                (Ok(a), Ok(b)) => a == b,
                _ => value.value == read_value,
            };
        }
        value.value == read_value
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn row(form: Value, approvers: Option<Value>) -> OutboxRow {
        OutboxRow {
            corp_id: "corp".into(),
            id: 1,
            idempotency_key: "k".into(),
            process_code: "PROC-1".into(),
            originator_user_id: "emp1".into(),
            dept_id: -1,
            form_values: form,
            approvers,
            cc_list: Some(vec!["u3".into(), "u4".into()]),
            cc_position: Some("FINISH".into()),
            select_approvers: None,
            state: "sending".into(),
            attempts: 1,
            next_attempt_at: chrono::Utc::now(),
            sent_at: None,
            last_error: None,
            process_instance_id: None,
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn form_values_become_the_strings_dingtalk_takes() {
        let request = create_request(&row(
            json!([
                {"name": "Reason", "value": "trip"},
                {"name": "Amount", "value": 100.5},
                {"name": ["开始时间", "结束时间"], "value": ["2019-02-19", "2019-02-25"]},
                {"name": "Receipts", "value": ["https://x/1.jpg"]},
                {"name": "Details", "value": [[{"name": "Item", "value": "pen"}, {"name": "Qty", "value": 2}]]},
                {"name": "Type", "value": "A", "ext_value": "{}"}
            ]),
            None,
        ))
        .unwrap();
        let values: Vec<(&str, &str)> = request
            .form_component_values
            .iter()
            .map(|v| (v.name.as_str(), v.value.as_str()))
            .collect();
        assert_eq!(
            values,
            [
                ("Reason", "trip"),
                ("Amount", "100.5"),
                (
                    r#"["开始时间","结束时间"]"#,
                    r#"["2019-02-19","2019-02-25"]"#
                ),
                ("Receipts", r#"["https://x/1.jpg"]"#),
                (
                    "Details",
                    r#"[[{"name":"Item","value":"pen"},{"name":"Qty","value":"2"}]]"#
                ),
                ("Type", "A"),
            ]
        );
        assert_eq!(
            request.form_component_values[5].ext_value.as_deref(),
            Some("{}")
        );
        assert_eq!(request.cc_list.as_deref(), Some("u3,u4"));
    }

    #[test]
    fn approvers_become_approver_nodes() {
        let request = create_request(&row(
            json!([{"name": "Reason", "value": "x"}]),
            Some(json!(["u1", {"action": "OR", "user_ids": ["u2", "u3"]}])),
        ))
        .unwrap();
        let nodes = request.approvers_v2.unwrap();
        assert_eq!(nodes[0].task_action_type, "NONE");
        assert_eq!(nodes[0].user_ids, ["u1"]);
        assert_eq!(nodes[1].task_action_type, "OR");
        assert_eq!(nodes[1].user_ids, ["u2", "u3"]);
    }

    fn instance(originator: &str, values: Value) -> ProcessInstance {
        serde_json::from_value(json!({
            "status": "RUNNING",
            "originator_userid": originator,
            "form_component_values": values,
        }))
        .unwrap()
    }

    #[test]
    fn an_instance_matches_on_originator_and_verbatim_values() {
        let sent = create_request(&row(
            json!([
                {"name": "Reason", "value": "trip 4711"},
                {"name": "Amount", "value": "100"},
                {"name": "Receiver", "value": "[\"emp1\"]"}
            ]),
            None,
        ))
        .unwrap();
        let read = json!([
            {"name": "Reason", "value": "trip 4711", "component_type": "TextField"},
            {"name": "Amount", "value": "100.00", "component_type": "MoneyField"},
            // People read back as names: not comparable, so not compared.
            {"name": "Receiver", "value": "张三", "component_type": "InnerContactField"}
        ]);
        assert!(matches(&sent, &instance("emp1", read.clone())));
        assert!(!matches(&sent, &instance("emp2", read)));
        let other_reason = json!([
            {"name": "Reason", "value": "trip 4712", "component_type": "TextField"},
            {"name": "Amount", "value": "100", "component_type": "MoneyField"},
            {"name": "Receiver", "value": "张三", "component_type": "InnerContactField"}
        ]);
        assert!(!matches(&sent, &instance("emp1", other_reason)));
        let missing =
            json!([{"name": "Reason", "value": "trip 4711", "component_type": "TextField"}]);
        assert!(!matches(&sent, &instance("emp1", missing)));
    }
}
