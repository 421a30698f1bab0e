//! A template's form schema as dingsync keeps it: the controls of one version, read from
//! DingTalk's `forms/schemas/processCodes` answer (docs/dingtalk.md §2.5), and the fingerprint
//! that tells two versions apart. Pure: no I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// One control of a form: what the view needs of DingTalk's `props`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// `props.id`, e.g. `TextField-K2AD4O5B`: stable while the control exists, also across a
    /// rename of its label. Instance values carry it as `id` (table cells as `key`).
    pub id: String,
    /// `componentName`, e.g. `MoneyField`.
    pub component: String,
    /// `props.label`. A date range's label is JSON text of its two labels.
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub biz_alias: Option<String>,
    #[serde(default)]
    pub required: bool,
    /// Choices of a select, as their texts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// Dates: `yyyy-MM-dd` or `yyyy-MM-dd HH:mm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A table's columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Control>,
}

/// One version of a template's form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormSchema {
    /// The template's name (`result.name`), e.g. `报销`.
    pub name: String,
    /// `result.gmtModified` as DingTalk wrote it (its format is unconfirmed, docs/dingtalk.md §2.5).
    pub modified: Option<String>,
    pub controls: Vec<Control>,
}

/// Components that hold no value (a note printed on the form): they get no column.
const NO_VALUE: &[&str] = &["TextNote"];

impl FormSchema {
    /// Reads the `result` of a schema answer. Unknown components are kept (their column is
    /// text); a control without an id cannot be matched with instance values and is left out.
    pub fn from_result(result: &Value) -> Result<FormSchema, String> {
        let name = result
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let modified = result.get("gmtModified").map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        let content = match result.get("schemaContent") {
            // Seen as an object in the SDK; accept JSON text too (the stricter reading of
            // "unconfirmed" is to read both).
            Some(Value::String(text)) => {
                serde_json::from_str(text).map_err(|e| format!("schemaContent is not JSON: {e}"))?
            }
            Some(v @ Value::Object(_)) => v.clone(),
            _ => return Err("result.schemaContent is missing".into()),
        };
        let items = content
            .get("items")
            .and_then(Value::as_array)
            .ok_or("schemaContent.items is missing")?;
        Ok(FormSchema {
            name,
            modified,
            controls: controls(items),
        })
    }

    /// The fingerprint of the controls: equal fingerprints, same version.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.controls)
    }
}

/// SHA-256 of the controls' JSON (field order fixed by the struct).
pub fn fingerprint(controls: &[Control]) -> String {
    let json = serde_json::to_vec(controls).expect("controls serialize");
    hex::encode(Sha256::digest(&json))
}

fn controls(items: &[Value]) -> Vec<Control> {
    items.iter().filter_map(control).collect()
}

fn control(item: &Value) -> Option<Control> {
    let component = item.get("componentName").and_then(Value::as_str)?;
    if NO_VALUE.contains(&component) {
        return None;
    }
    let props = item.get("props")?;
    let text = |key: &str| {
        props
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let id = text("id")?;
    let label = match props.get("label") {
        Some(Value::String(s)) => s.clone(),
        // A date range's label as an array rather than its JSON text.
        Some(v @ Value::Array(_)) => v.to_string(),
        _ => id.clone(),
    };
    let required = match props.get("required") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    };
    let options = props
        .get("options")
        .and_then(Value::as_array)
        .map(|options| options.iter().filter_map(option_text).collect())
        .unwrap_or_default();
    let children = item
        .get("children")
        .and_then(Value::as_array)
        .map(|c| controls(c))
        .unwrap_or_default();
    Some(Control {
        id,
        component: component.to_string(),
        label,
        biz_alias: text("bizAlias"),
        required,
        options,
        format: text("format"),
        children,
    })
}

/// An option as its text. DingTalk's encoding is unconfirmed (docs/dingtalk.md §2.5): a plain
/// string, an object `{"value", "key"}`, or that object as JSON text; all three are read.
fn option_text(option: &Value) -> Option<String> {
    match option {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(inner @ Value::Object(_)) => option_text(&inner),
            _ => Some(s.clone()),
        },
        Value::Object(o) => o
            .get("value")
            .or_else(|| o.get("text"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_schema_answer_becomes_controls_with_options_in_every_encoding() {
        let result = json!({
            "name": "报销", "processCode": "PROC-1", "gmtModified": "1638326995000",
            "schemaContent": {"title": "报销", "items": [
                {"componentName": "TextField", "props": {"id": "TextField-A", "label": "Reason", "required": true, "bizAlias": "reason"}},
                {"componentName": "TextNote", "props": {"id": "TextNote-N", "label": "说明"}},
                {"componentName": "DDSelectField", "props": {"id": "DDSelectField-B", "label": "Type",
                    "options": ["{\"value\":\"差旅\",\"key\":\"option_0\"}", {"value": "办公", "key": "option_1"}, "招待"]}},
                {"componentName": "TableField", "props": {"id": "TableField-T", "label": "明细"},
                 "children": [{"componentName": "MoneyField", "props": {"id": "MoneyField-C", "label": "金额"}}]},
                {"componentName": "DDDateRangeField", "props": {"id": "DDDateRangeField-R", "label": ["开始时间", "结束时间"], "format": "yyyy-MM-dd"}},
                {"componentName": "TextField", "props": {"label": "no id"}}
            ]}
        });
        let schema = FormSchema::from_result(&result).unwrap();
        assert_eq!(schema.name, "报销");
        let ids: Vec<&str> = schema.controls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "TextField-A",
                "DDSelectField-B",
                "TableField-T",
                "DDDateRangeField-R"
            ]
        );
        assert_eq!(schema.controls[0].biz_alias.as_deref(), Some("reason"));
        assert!(schema.controls[0].required);
        assert_eq!(schema.controls[1].options, ["差旅", "办公", "招待"]);
        assert_eq!(schema.controls[2].children[0].id, "MoneyField-C");
        assert_eq!(schema.controls[3].label, r#"["开始时间","结束时间"]"#);
        assert_eq!(schema.controls[3].format.as_deref(), Some("yyyy-MM-dd"));
        let mut renamed = schema.clone();
        renamed.controls[0].label = "Why".into();
        assert_ne!(schema.fingerprint(), renamed.fingerprint());
        assert_eq!(schema.fingerprint(), schema.clone().fingerprint());
    }

    #[test]
    fn an_answer_without_items_is_an_error_not_an_empty_form() {
        assert!(FormSchema::from_result(&json!({"name": "x"})).is_err());
        assert!(FormSchema::from_result(&json!({"schemaContent": {"title": "x"}})).is_err());
        let text = json!({"schemaContent": "{\"items\": []}"});
        assert!(FormSchema::from_result(&text).unwrap().controls.is_empty());
    }
}
