-- Per class: how often the labels and the model disagree. A positive "disagrees" when the class is
-- not in the image's top-`top`; a negative when it is. Variables: top (INTEGER).
SELECT v.class_index, v.class_id, v.class_name, v.unseen,
       count(*) FILTER (WHERE j.label = 1) AS positives,
       count(*) FILTER (WHERE j.label = -1) AS negatives,
       count(*) FILTER (WHERE j.label = 1 AND j.rank > getvariable('top')) AS positives_not_predicted,
       count(*) FILTER (WHERE j.label = -1 AND j.rank <= getvariable('top')) AS negatives_predicted,
       (count(*) FILTER (WHERE (j.label = 1 AND j.rank > getvariable('top'))
                          OR (j.label = -1 AND j.rank <= getvariable('top'))))::DOUBLE
           / nullif(count(j.label), 0) AS disagreement_rate
FROM vocab v LEFT JOIN judged j USING (class_index)
GROUP BY ALL
ORDER BY disagreement_rate DESC NULLS LAST, v.class_index;
