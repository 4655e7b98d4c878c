//! The environment overlay: `PALOMA_SECTION__KEY` variables over the file's values.

use super::ConfigError;

/// `PALOMA_DELIVERY__RELAY=host:port` sets `[delivery] relay`. Values are read as TOML when
/// they parse as such (numbers, booleans, arrays), else as plain strings.
pub(super) fn apply(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("PALOMA_") else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let parsed = if super::secrets::is_secret_key(&key) && key != "old_secrets" {
            toml::Value::String(value)
        } else {
            toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value))
        };
        let entry = root
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key, parsed);
            }
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "{name}: [{section}] is not a table section"
                )))
            }
        }
    }
    Ok(())
}
