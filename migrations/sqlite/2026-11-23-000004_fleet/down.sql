DROP TABLE offers;
DROP TABLE hospitals;
DROP TABLE units;
