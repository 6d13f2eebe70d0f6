DROP TABLE bus_cursors;
