//! Geographic points and distances (pure maths).

use serde::{Deserialize, Serialize};

use super::validation::FieldError;

/// A WGS84 position.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatLng {
    /// Latitude in degrees, −90..90.
    pub lat: f64,
    /// Longitude in degrees, −180..180.
    pub lng: f64,
}

impl LatLng {
    /// Checks ranges, reporting problems under `pointer`.
    pub fn validate(&self, pointer: &str, errors: &mut Vec<FieldError>) {
        if !self.lat.is_finite() || !(-90.0..=90.0).contains(&self.lat) {
            errors.push(FieldError::new(
                format!("{pointer}/lat"),
                "must be between -90 and 90",
            ));
        }
        if !self.lng.is_finite() || !(-180.0..=180.0).contains(&self.lng) {
            errors.push(FieldError::new(
                format!("{pointer}/lng"),
                "must be between -180 and 180",
            ));
        }
    }

    /// Great-circle distance in metres (haversine).
    pub fn distance_m(&self, other: &LatLng) -> f64 {
        const EARTH_RADIUS_M: f64 = 6_371_008.8;
        let (lat1, lat2) = (self.lat.to_radians(), other.lat.to_radians());
        let dlat = lat2 - lat1;
        let dlng = (other.lng - self.lng).to_radians();
        let a = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlng / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_M * a.sqrt().asin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haversine_matches_a_known_distance() {
        // London (Trafalgar Square) to Paris (Notre-Dame): about 342 km.
        let london = LatLng {
            lat: 51.5080,
            lng: -0.1281,
        };
        let paris = LatLng {
            lat: 48.8530,
            lng: 2.3499,
        };
        let d = london.distance_m(&paris);
        assert!((d - 342_000.0).abs() < 3_000.0, "{d}");
        assert_eq!(london.distance_m(&london), 0.0);
    }

    #[test]
    fn ranges_are_checked() {
        let mut errors = Vec::new();
        LatLng {
            lat: 91.0,
            lng: -181.0,
        }
        .validate("/home_location", &mut errors);
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].pointer, "/home_location/lat");
        assert_eq!(errors[1].pointer, "/home_location/lng");
    }
}
