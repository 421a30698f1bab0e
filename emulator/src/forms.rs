//! Template form schemas as DingTalk's v1.0 `GET /v1.0/workflow/forms/schemas/processCodes`
//! answers them (docs/dingtalk.md §2.5); the route (`api_v1`) serves this behind the gate every
//! call passes (token header, faults, the allowance).
//!
//! Where the docs are unconfirmed this takes the stricter reading: `options` are JSON text of
//! `{"value", "key"}` objects (what real answers were seen to carry), `gmtModified` an epoch-ms
//! string, a date range's label the JSON text of its two labels.
//!
//! Owns: the answer's shape. Does not own: the templates (`model`) or the route (`api_v1`).

use serde_json::{Value, json};

use super::model::{Control, Template};

/// `result` of the schema answer for `template`.
pub fn schema_result(template: &Template, corp_id: &str) -> Value {
    // An epoch-ms string (the doc's example), moving with each published revision.
    let modified = (1_764_300_000_000_i64 + i64::from(template.revision) * 60_000).to_string();
    json!({
        "name": template.name,
        "processCode": template.process_code,
        "formCode": template.process_code,
        "formUuid": format!("FORM-{}", template.process_code.trim_start_matches("PROC-")),
        "appUuid": corp_id,
        "ownerIdType": "orgId",
        "status": "PUBLISHED",
        "engineType": 0,
        "procType": "inner",
        "icon": "common",
        "gmtCreate": "1764300000000",
        "gmtModified": modified,
        "schemaContent": {
            "title": template.name,
            "icon": "common",
            "items": template.controls.iter().map(|c| item(template, c)).collect::<Vec<_>>(),
        },
    })
}

fn item(template: &Template, control: &Control) -> Value {
    let mut props = json!({
        "id": template.control_id(control),
        "label": control.label,
        "required": control.required,
        "bizAlias": control.biz_alias.clone().unwrap_or_default(),
    });
    if !control.options.is_empty() {
        props["options"] = control
            .options
            .iter()
            .enumerate()
            .map(|(i, o)| {
                Value::String(json!({"value": o, "key": format!("option_{i}")}).to_string())
            })
            .collect();
    }
    if let Some(format) = &control.format {
        props["format"] = format.clone().into();
    }
    let mut answer = json!({"componentName": control.component_type, "props": props});
    if !control.children.is_empty() {
        answer["children"] = control.children.iter().map(|c| item(template, c)).collect();
    }
    answer
}
