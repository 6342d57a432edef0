//! Queries on a collection: the SQL conditions that let an index on a field narrow a selector
//! scan.

use ferry_core::selector::Selector;

/// SQL conditions that select a superset of what `selector` matches, so that an index on
/// `json_extract(body, path)` narrows the scan. Only top-level conditions comparing a field
/// with a number or a string are translated: SQLite orders integers and reals numerically and
/// text by bytes (code points), as the selector does, and values of other types that slip
/// through are removed by the exact check that follows.
pub(super) fn sql_prefilter(selector: &Selector) -> (String, Vec<rusqlite::types::Value>) {
    use ferry_core::selector::Condition;
    use rusqlite::types::Value as Sql;
    let parts: Vec<&Selector> = match selector {
        Selector::And(parts) => parts.iter().collect(),
        other => vec![other],
    };
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    let mut add = |path: &str, operator: &str, operand: &serde_json::Value| {
        let value = match operand {
            serde_json::Value::Number(number) => match (number.as_i64(), number.as_f64()) {
                (Some(integer), _) => Sql::Integer(integer),
                (None, Some(real)) => Sql::Real(real),
                _ => return,
            },
            serde_json::Value::String(text) => Sql::Text(text.clone()),
            _ => return,
        };
        values.push(value);
        conditions.push(format!(
            " AND json_extract(body, '{path}') {operator} ?{}",
            values.len() + 1
        ));
    };
    for part in parts {
        let Selector::Field { path, condition } = part else {
            continue;
        };
        let Some(path) = json_path(&path.join(".")) else {
            continue;
        };
        let simple: Vec<&Condition> = match condition {
            Condition::AllOf(all) => all.iter().collect(),
            other => vec![other],
        };
        for condition in simple {
            match condition {
                Condition::Eq(operand) => add(&path, "=", operand),
                Condition::Gt(operand) => add(&path, ">", operand),
                Condition::Gte(operand) => add(&path, ">=", operand),
                Condition::Lt(operand) => add(&path, "<", operand),
                Condition::Lte(operand) => add(&path, "<=", operand),
                _ => {}
            }
        }
    }
    (conditions.concat(), values)
}

/// `a.b_c` → `$.a.b_c`; `None` for field names that cannot be embedded in SQL safely.
pub(super) fn json_path(field: &str) -> Option<String> {
    let valid = !field.is_empty()
        && field.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
        });
    valid.then(|| format!("$.{field}"))
}
