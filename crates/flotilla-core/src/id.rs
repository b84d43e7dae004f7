//! Names and ids, validated once at the edge so the rest of the code can trust them.

use crate::FieldError;

/// Service names are DNS labels (they are served as `NAME.service.flotilla`).
pub fn validate_service_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{name:?} is not a service name: 1-63 of [a-z0-9-], not starting or ending with '-'"),
        ))
    }
}

fn simple_id(field: &str, what: &str, value: &str) -> Result<(), FieldError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !value.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "{value:?} is not a valid {what}: 1-128 of [A-Za-z0-9._-], not starting with '.'"
            ),
        ))
    }
}

/// Instance ids travel in URLs and store keys: a restricted alphabet keeps both safe.
pub fn validate_instance_id(field: &str, id: &str) -> Result<(), FieldError> {
    simple_id(field, "instance id", id)
}

/// Node names travel in URLs and store keys, like instance ids.
pub fn validate_node_name(field: &str, name: &str) -> Result<(), FieldError> {
    simple_id(field, "node name", name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn service_names() {
        assert!(validate_service_name("s", "web").is_ok());
        assert!(validate_service_name("s", "web-2").is_ok());
        assert!(validate_service_name("s", "Web").is_err());
        assert!(validate_service_name("s", "-web").is_err());
        assert!(validate_service_name("s", "").is_err());
        assert!(validate_service_name("s", &"a".repeat(64)).is_err());
    }

    proptest! {
        #[test]
        fn valid_ids_never_contain_path_separators(s in ".{0,200}") {
            if validate_instance_id("id", &s).is_ok() {
                prop_assert!(!s.contains('/') && !s.contains("..") || !s.starts_with('.'));
                prop_assert!(!s.contains('/'));
            }
        }
    }
}
