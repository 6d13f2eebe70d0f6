DROP TABLE insurance_claims;
DROP TABLE insurance_policies;
