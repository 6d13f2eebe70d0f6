-- Which provider gave an offer's ETA (`google`, `osrm`, `straight_line`; docs/interop.md §5).
-- Offers stored before this column existed were ranked by OSRM when their reason says so, by
-- the straight line otherwise.
ALTER TABLE offers ADD COLUMN eta_source TEXT NOT NULL DEFAULT 'straight_line';
UPDATE offers SET eta_source = 'osrm' WHERE reason = 'closest_by_eta';
