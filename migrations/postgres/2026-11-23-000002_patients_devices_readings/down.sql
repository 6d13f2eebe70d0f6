DROP TABLE readings;
DROP TABLE devices;
DROP TABLE next_of_kin;
DROP TABLE patients;
