package ordersvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/google/uuid"
)

// ErrNotFound: no such order.
var ErrNotFound = errors.New("order not found")

// ErrConflict: the order kept changing under the request.
var ErrConflict = errors.New("order changed concurrently; try again")

// BadRequestError names what is wrong with a request.
type BadRequestError struct{ Field, Problem string }

func (e *BadRequestError) Error() string { return e.Field + ": " + e.Problem }

func validLine(l Line) error {
	switch {
	case strings.TrimSpace(l.SKU) == "":
		return &BadRequestError{"sku", "is required"}
	case l.Qty <= 0:
		return &BadRequestError{"qty", fmt.Sprintf("must be positive, got %d", l.Qty)}
	case l.PriceCents < 0:
		return &BadRequestError{"price_cents", fmt.Sprintf("must not be negative, got %d", l.PriceCents)}
	}
	return nil
}

// Create stores a new order (version 1) for customer with lines.
func (in *Instance) Create(ctx context.Context, customer string, lines []Line) (Order, error) {
	if strings.TrimSpace(customer) == "" {
		return Order{}, &BadRequestError{"customer_id", "is required"}
	}
	for i, l := range lines {
		if err := validLine(l); err != nil {
			return Order{}, fmt.Errorf("lines[%d].%w", i, err)
		}
	}
	id, err := uuid.NewV7()
	if err != nil {
		return Order{}, err
	}
	o := Order{ID: id.String(), CustomerID: customer, Status: "open", Lines: lines, Version: 1,
		CreatedAt: time.Now().UTC().Truncate(time.Millisecond)}
	if o.Lines == nil {
		o.Lines = []Line{}
	}
	o.TotalCents = o.total()
	applied, err := in.writer.Write(ctx, o)
	if err == nil && !applied {
		err = ErrConflict
	}
	// The order is returned with an error too: its ID is the key the
	// request was routed by.
	return o, err
}

// AddLine appends a line: read the order where it is served, write the next
// version to both sides; the authoritative write is conditional on the
// version read, so two racing changes never both win.
func (in *Instance) AddLine(ctx context.Context, id string, l Line) (Order, error) {
	if err := validLine(l); err != nil {
		return Order{}, err
	}
	for range 5 {
		cur, err := in.Get(ctx, id)
		if err != nil {
			return Order{}, err
		}
		next := cur
		next.Lines = append(append([]Line(nil), cur.Lines...), l)
		next.Version = cur.Version + 1
		next.TotalCents = next.total()
		applied, err := in.writer.Write(ctx, next)
		if err != nil {
			return Order{}, err
		}
		if applied {
			return next, nil
		}
	}
	return Order{}, ErrConflict
}

// Get reads an order from the side its stage serves.
func (in *Instance) Get(ctx context.Context, id string) (Order, error) {
	o, err := in.getter.Read(ctx, id)
	if err != nil {
		return Order{}, err
	}
	if o.ID == "" {
		return Order{}, ErrNotFound
	}
	return o, nil
}

// List reads a customer's orders (oldest first, at most 100).
func (in *Instance) List(ctx context.Context, customer string) ([]Order, error) {
	if strings.TrimSpace(customer) == "" {
		return nil, &BadRequestError{"customer", "is required"}
	}
	list, err := in.lister.Read(ctx, customer)
	if list == nil && err == nil {
		list = []Order{}
	}
	return list, err
}

// Header names of the API's responses.
const (
	// HeaderStage is the stage of the request's key when the request
	// started, HeaderStageEnd when it ended (they differ when the flag
	// changed under the request).
	HeaderStage    = "X-Dimmer-Stage"
	HeaderStageEnd = "X-Dimmer-Stage-End"
	// HeaderFailedSide names the store side whose failure failed the request.
	HeaderFailedSide = "X-Dimmer-Failed-Side"
)

// Handler is the JSON API:
//
//	POST /orders                      {"customer_id": "...", "lines": [{"sku": "...", "qty": 1, "price_cents": 250}]}
//	GET  /orders/{id}
//	POST /orders/{id}/lines           {"sku": "...", "qty": 1, "price_cents": 250}
//	GET  /customers/{id}/orders
func (in *Instance) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			CustomerID string `json:"customer_id"`
			Lines      []Line `json:"lines"`
		}
		if !decode(w, r, &req) {
			return
		}
		o, err := in.Create(r.Context(), req.CustomerID, req.Lines)
		in.reply(w, r, o.ID, http.StatusCreated, o, err)
	})
	mux.HandleFunc("GET /orders/{id}", func(w http.ResponseWriter, r *http.Request) {
		o, err := in.Get(r.Context(), r.PathValue("id"))
		in.reply(w, r, r.PathValue("id"), http.StatusOK, o, err)
	})
	mux.HandleFunc("POST /orders/{id}/lines", func(w http.ResponseWriter, r *http.Request) {
		var l Line
		if !decode(w, r, &l) {
			return
		}
		o, err := in.AddLine(r.Context(), r.PathValue("id"), l)
		in.reply(w, r, r.PathValue("id"), http.StatusOK, o, err)
	})
	mux.HandleFunc("GET /customers/{id}/orders", func(w http.ResponseWriter, r *http.Request) {
		list, err := in.List(r.Context(), r.PathValue("id"))
		in.reply(w, r, r.PathValue("id"), http.StatusOK, list, err)
	})
	// The flag's state at the start of the request, for the reply's
	// headers: the key of a new order is known only once it is made.
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		state, known := in.provider.Snapshot(Migration)
		stageOf := func(key string) string {
			if !known {
				return in.Stage(r.Context(), key).String()
			}
			return state.StageFor(key).String()
		}
		mux.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), startStage{}, stageOf)))
	})
}

type startStage struct{}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "malformed JSON body: " + err.Error()})
		return false
	}
	return true
}

func (in *Instance) reply(w http.ResponseWriter, r *http.Request, key string, status int, body any, err error) {
	if key != "" {
		if st, ok := r.Context().Value(startStage{}).(func(string) string); ok {
			w.Header().Set(HeaderStage, st(key))
		}
		w.Header().Set(HeaderStageEnd, in.Stage(r.Context(), key).String())
	}
	var bad *BadRequestError
	var side *SideError
	switch {
	case err == nil:
		writeJSON(w, status, body)
	case errors.As(err, &bad):
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
	case errors.Is(err, ErrNotFound):
		writeJSON(w, http.StatusNotFound, map[string]string{"error": err.Error()})
	case errors.Is(err, ErrConflict):
		writeJSON(w, http.StatusConflict, map[string]string{"error": err.Error()})
	default:
		failed := "unknown"
		if errors.As(err, &side) {
			failed = side.Side.String()
		}
		w.Header().Set(HeaderFailedSide, failed)
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error(), "side": failed})
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
